"""A packet capture on loopback (tcpdump), to prove what never crosses the wire."""

from __future__ import annotations

import shutil
import signal
import subprocess
import time
from pathlib import Path
from types import TracebackType


class LoopbackCapture:
    def __init__(self, path: Path) -> None:
        self.path = path
        self._proc: subprocess.Popen[bytes] | None = None
        self._err = path.with_suffix(".stderr")

    def __enter__(self) -> LoopbackCapture:
        tcpdump = shutil.which("tcpdump") or "/usr/bin/tcpdump"
        err = open(self._err, "wb")
        self._proc = subprocess.Popen(
            # --immediate-mode: without it libpcap hands packets over in ring blocks, and
            # the blocks not yet full when a short run ends are lost at SIGINT.
            [tcpdump, "--immediate-mode", "-ilo", "-s0", "-U", "-n", "-w", str(self.path), "tcp"],
            stdout=subprocess.DEVNULL,
            stderr=err,
        )
        err.close()
        deadline = time.monotonic() + 10
        while b"listening on" not in self._err.read_bytes():
            if self._proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"tcpdump did not start: {self._err.read_text()}")
            time.sleep(0.02)
        return self

    def __exit__(
        self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        assert self._proc is not None
        time.sleep(0.2)  # let the last packets of the run reach the capture
        self._proc.send_signal(signal.SIGINT)
        self._proc.wait(10)

    def data(self) -> bytes:
        return self.path.read_bytes()

    def packets(self) -> int:
        text = self._err.read_text()
        for line in text.splitlines():
            if "packets captured" in line:
                return int(line.split()[0])
        return -1
