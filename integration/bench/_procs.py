"""The bench's processes: started pinned, in their own process group, stopped by id.

Every long-running process (proxies, backends, the coordinator's helpers) is started
through ``Processes.spawn`` in a new session, so that stopping it can reach everything it
forked (nginx workers, meshproxy's app) with one ``killpg`` on its own group id, and a
Ctrl-C in the terminal reaches only the orchestrator, which then stops them in order.
Accounting reads ``/proc``: CPU seconds (utime + stime, all threads) and RSS of a chosen
set of processes, and the busy share of each CPU from ``/proc/stat``.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

CLK_TCK = os.sysconf("SC_CLK_TCK")


@dataclass
class Proc:
    name: str
    popen: subprocess.Popen[bytes]
    log: Path

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def tail(self, chars: int = 2000) -> str:
        try:
            return self.log.read_text(errors="replace")[-chars:]
        except OSError:
            return ""


class Processes:
    """Everything the bench started and has not stopped yet."""

    def __init__(self, log_dir: Path) -> None:
        self.log_dir = log_dir
        self._procs: list[Proc] = []

    def spawn(
        self,
        name: str,
        argv: Sequence[str],
        *,
        env: dict[str, str] | None = None,
        cwd: Path | None = None,
    ) -> Proc:
        log = self.log_dir / f"{name}.log"
        with open(log, "ab") as fh:
            popen = subprocess.Popen(
                list(argv),
                stdout=fh,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=env,
                cwd=cwd,
                start_new_session=True,
            )
        proc = Proc(name, popen, log)
        self._procs.append(proc)
        return proc

    def stop(self, proc: Proc, timeout: float = 15.0) -> None:
        """SIGTERM to the process group, then SIGKILL to what is left of it."""
        pgid = proc.pid  # start_new_session: the leader's pid is the group id
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pgid, signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.popen.wait(timeout)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pgid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.popen.wait(5)
        if proc in self._procs:
            self._procs.remove(proc)

    def stop_all(self) -> None:
        for proc in reversed(list(self._procs)):
            self.stop(proc)


# -- readiness ----------------------------------------------------------------------------
def wait_until(
    predicate: Callable[[], bool], timeout: float, what: str, proc: Proc | None = None
) -> None:
    deadline = time.monotonic() + timeout
    delay = 0.01
    while time.monotonic() < deadline:
        if predicate():
            return
        if proc is not None and not proc.alive():
            raise RuntimeError(
                f"{what}: {proc.name} exited ({proc.popen.returncode})\n{proc.tail()}"
            )
        time.sleep(delay)
        delay = min(delay * 2, 0.2)
    tail = proc.tail() if proc is not None else ""
    raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {what}\n{tail}")


def accepts(address: str) -> bool:
    """Whether something accepts connections at ``HOST:PORT`` or ``unix:PATH``."""
    if address.startswith("unix:"):
        family, target = socket.AF_UNIX, address[5:]
        sock = socket.socket(family, socket.SOCK_STREAM)
        where: str | tuple[str, int] = target
    else:
        host, _, port = address.rpartition(":")
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        where = (host, int(port))
    with sock:
        sock.settimeout(1.0)
        try:
            sock.connect(where)
        except OSError:
            return False
    return True


# -- accounting ---------------------------------------------------------------------------
def _stat_fields(pid: int) -> list[str] | None:
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return raw[raw.rindex(")") + 2 :].split()  # fields from 3 (state) on


def children(pid: int) -> list[int]:
    out = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            fields = _stat_fields(int(entry))
            if fields is not None and int(fields[1]) == pid:
                out.append(int(entry))
    return out


def wait_children(pid: int, count: int, timeout: float = 10.0) -> list[int]:
    """The children of ``pid`` once there are ``count`` of them (an nginx master accepts on
    its port before its workers exist: a meter started then would miss their CPU)."""
    deadline = time.monotonic() + timeout
    while True:
        kids = children(pid)
        if len(kids) >= count or time.monotonic() > deadline:
            return kids
        time.sleep(0.01)


def cpu_seconds(pids: Sequence[int]) -> float:
    """utime + stime of the processes (every thread, live and exited), in seconds."""
    ticks = 0
    for pid in pids:
        fields = _stat_fields(pid)
        if fields is not None:
            ticks += int(fields[11]) + int(fields[12])  # utime, stime (fields 14, 15)
    return ticks / CLK_TCK


def rss_kib(pids: Sequence[int]) -> int:
    total = 0
    for pid in pids:
        with contextlib.suppress(OSError):
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
    return total


def cpu_times() -> dict[str, tuple[int, int]]:
    """Per CPU: (busy, total) jiffies since boot, from /proc/stat."""
    out = {}
    for line in Path("/proc/stat").read_text().splitlines():
        name, *vals = line.split()
        if name.startswith("cpu") and name != "cpu":
            nums = [int(v) for v in vals[:8]]
            idle = nums[3] + nums[4]  # idle + iowait
            out[name] = (sum(nums) - idle, sum(nums))
    return out


def busy_pct(
    before: dict[str, tuple[int, int]], after: dict[str, tuple[int, int]]
) -> dict[str, float]:
    out = {}
    for cpu, (busy, total) in after.items():
        b0, t0 = before.get(cpu, (0, 0))
        out[cpu] = round(100.0 * (busy - b0) / max(1, total - t0), 1)
    return out


_PF_KTHREAD = 0x00200000


def foreign_ticks() -> dict[int, int]:
    """CPU ticks (own + reaped children's) of every user process outside this bench.

    "Outside" = not this orchestrator nor any of its descendants. Kernel threads are left
    out: ksoftirqd and friends mostly do this bench's own loopback work.
    """
    table: dict[int, tuple[int, int]] = {}  # pid -> (ppid, ticks)
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        fields = _stat_fields(int(entry))
        if fields is None or int(fields[6]) & _PF_KTHREAD:
            continue
        ticks = sum(int(f) for f in fields[11:15])  # utime stime cutime cstime
        table[int(entry)] = (int(fields[1]), ticks)
    ours = {os.getpid()}
    for _ in range(64):  # a process tree is far shallower; bounded all the same
        grown = ours | {pid for pid, (ppid, _) in table.items() if ppid in ours}
        if grown == ours:
            break
        ours = grown
    return {pid: ticks for pid, (_, ticks) in table.items() if pid not in ours}


@dataclass
class Meter:
    """Over one load run: the proxy's CPU seconds, wall seconds, CPU busy shares, and the
    CPU seconds other work on this machine took meanwhile (interference)."""

    pids: Callable[[], list[int]]
    cpu_s: float = 0.0
    wall_s: float = 0.0
    foreign_s: float = 0.0
    busy: dict[str, float] = field(default_factory=dict)

    def __enter__(self) -> Meter:
        self._pids = self.pids()
        self._foreign0 = foreign_ticks()
        self._cpu0 = cpu_seconds(self._pids)
        self._cpus0 = cpu_times()
        self._t0 = time.monotonic()
        return self

    def __exit__(self, *exc: object) -> None:
        self.wall_s = time.monotonic() - self._t0
        self.cpu_s = cpu_seconds(self._pids) - self._cpu0
        self.busy = busy_pct(self._cpus0, cpu_times())
        after = foreign_ticks()
        ticks = sum(max(0, t - self._foreign0.get(pid, 0)) for pid, t in after.items())
        self.foreign_s = ticks / CLK_TCK

    @property
    def foreign_pct(self) -> float:
        """Other work's CPU share during the run, in % of one CPU."""
        return 100 * self.foreign_s / max(self.wall_s, 1e-3)
