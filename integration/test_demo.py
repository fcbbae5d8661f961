"""The demo topology end to end, under a loopback packet capture."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

from integration.capture import LoopbackCapture
from integration.harness import ROOT


def test_demo_runs_and_no_plaintext_or_key_crosses_loopback(tmp_path: Path) -> None:
    with LoopbackCapture(tmp_path / "demo.pcap") as cap:
        res = subprocess.run(
            [sys.executable, "-m", "integration.demo"],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=180,
            stdin=subprocess.DEVNULL,
        )
    out = res.stdout + res.stderr
    assert res.returncode == 0, out
    assert "demo finished" in out
    # Who called whom, with verified identities, as the proxies logged them.
    assert "peer=spiffe://demo.meshproxy.local/marble/frontend" in out
    assert "peer=spiffe://demo.meshproxy.local/marble/backend" in out
    assert "hello from the attested backend" in out
    marker = re.search(r"demo-[0-9a-f]{12}", out)
    assert marker, out
    wire = cap.data()
    assert cap.packets() > 20, "the capture saw no traffic: it proves nothing"
    assert marker.group(0).encode() not in wire
    assert b"hello from the attested backend" not in wire
    assert b"PRIVATE KEY" not in wire
    assert "PRIVATE KEY" not in out
    assert "Traceback" not in out
