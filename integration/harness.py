"""Starts real meshproxy processes (coordinator, marbles) and the CLI, the way users do.

Used by the integration tests and by ``make demo``. Every process writes its log to a
file; readiness is polled (the coordinator's status endpoint, a marble's ready.json),
never slept for. Everything started is stopped by ``close()``.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
CONFIGS = ROOT / "configs"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for(
    predicate: Any,
    timeout: float,
    what: str,
    proc: subprocess.Popen[bytes] | None = None,
    log: Path | None = None,
) -> Any:
    deadline = time.monotonic() + timeout
    delay = 0.01
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        if proc is not None and proc.poll() is not None:
            tail = log.read_text(errors="replace")[-3000:] if log and log.exists() else ""
            raise RuntimeError(f"{what}: process exited with {proc.returncode}\n{tail}")
        time.sleep(delay)
        delay = min(delay * 2, 0.2)
    tail = log.read_text(errors="replace")[-3000:] if log and log.exists() else ""
    raise TimeoutError(f"timed out after {timeout}s waiting for {what}\n{tail}")


@dataclass
class Proc:
    name: str
    popen: subprocess.Popen[bytes]
    log: Path
    info: dict[str, Any] = field(default_factory=dict)

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 15) -> int:
        if self.popen.poll() is None:
            self.popen.send_signal(sig)
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait(5)
        return self.popen.returncode

    def log_events(self) -> list[dict[str, Any]]:
        out = []
        for line in self.log.read_text(errors="replace").splitlines():
            with contextlib.suppress(json.JSONDecodeError):
                doc = json.loads(line)
                if isinstance(doc, dict):
                    out.append(doc)
        return out


class Cluster:
    """One coordinator (simulated) plus marbles, all under one temporary directory."""

    def __init__(self, base: Path, *, env: dict[str, str] | None = None) -> None:
        self.base = base
        base.mkdir(parents=True, exist_ok=True)
        self.logs = base / "logs"
        self.logs.mkdir(exist_ok=True)
        self.env = dict(os.environ)
        self.env.update(
            {
                "MESHPROXY_SIM_PLATFORM": str(base / "sim-platform"),
                "MESHPROXY_CONFIG_DIR": str(base / "client-config"),
                "PYTHONUNBUFFERED": "1",
            }
        )
        self.env.update(env or {})
        self.procs: list[Proc] = []
        self.client_addr = ""
        self.mesh_addr = ""

    # -- processes -------------------------------------------------------------------------
    def spawn(self, name: str, argv: Sequence[str], cwd: Path | None = None) -> Proc:
        log = self.logs / f"{name}.log"
        fh = open(log, "ab")  # noqa: SIM115 (lives as long as the process)
        popen = subprocess.Popen(
            list(argv),
            stdout=fh,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=self.env,
            cwd=cwd or self.base,
        )
        fh.close()
        proc = Proc(name, popen, log)
        self.procs.append(proc)
        return proc

    def meshproxy(self) -> list[str]:
        return [sys.executable, "-m", "meshproxy"]

    def cli(
        self, *args: str, check: bool = True, timeout: float = 60
    ) -> subprocess.CompletedProcess[str]:
        res = subprocess.run(
            [*self.meshproxy(), *args],
            env=self.env,
            cwd=self.base,
            capture_output=True,
            text=True,
            timeout=timeout,
            stdin=subprocess.DEVNULL,
        )
        if check and res.returncode != 0:
            raise RuntimeError(
                f"meshproxy {' '.join(args)} exited {res.returncode}\n{res.stdout}\n{res.stderr}"
            )
        return res

    # -- coordinator -----------------------------------------------------------------------
    def start_coordinator(
        self,
        *,
        client_port: int = 0,
        mesh_port: int = 0,
        name: str = "coordinator",
        state_dir: Path | None = None,
        extra: Sequence[str] = ("--simulation",),
    ) -> Proc:
        state = state_dir or self.base / "coordinator-state"
        endpoints = state / "endpoints.json"
        with contextlib.suppress(FileNotFoundError):
            endpoints.unlink()
        proc = self.spawn(
            name,
            [
                *self.meshproxy(),
                "coordinator",
                "--state-dir",
                str(state),
                "--client-addr",
                f"127.0.0.1:{client_port}",
                "--mesh-addr",
                f"127.0.0.1:{mesh_port}",
                *extra,
            ],
        )
        info = wait_for(
            lambda: _read_json(endpoints), 60, "coordinator endpoints", proc.popen, proc.log
        )
        proc.info = info
        self.client_addr, self.mesh_addr = info["client"], info["mesh"]
        return proc

    # -- marbles ---------------------------------------------------------------------------
    def start_marble(
        self, name: str, config: Path, app: Sequence[str], *, wait: bool = True, timeout: float = 60
    ) -> Proc:
        workdir = marble_workdir(config)
        with contextlib.suppress(FileNotFoundError):
            (workdir / "ready.json").unlink()
        proc = self.spawn(
            name, [*self.meshproxy(), "run", "--config", str(config), "--", *app], cwd=config.parent
        )
        if wait:
            proc.info = wait_for(
                lambda: _read_json(workdir / "ready.json"),
                timeout,
                f"marble {name} ready",
                proc.popen,
                proc.log,
            )
        return proc

    def close(self) -> None:
        for proc in reversed(self.procs):
            proc.stop()

    def __enter__(self) -> Cluster:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def marble_workdir(config: Path) -> Path:
    import yaml

    doc = yaml.safe_load(config.read_text())
    workdir = Path(doc["workdir"])
    return workdir if workdir.is_absolute() else config.parent / workdir


def copy_configs(src: Path, dst: Path, replacements: dict[str, str] | None = None) -> Path:
    """A private copy of a configs/ folder, with text replacements (ports, addresses)."""
    shutil.copytree(src, dst, dirs_exist_ok=True)
    for path in dst.iterdir():
        if path.suffix in (".yaml", ".yml", ".json") and replacements:
            text = path.read_text()
            for old, new in replacements.items():
                text = text.replace(old, new)
            path.write_text(text)
    return dst


@contextlib.contextmanager
def cluster(base: Path) -> Iterator[Cluster]:
    c = Cluster(base)
    try:
        yield c
    finally:
        c.close()
