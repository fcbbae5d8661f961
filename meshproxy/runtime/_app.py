"""The app under supervision: its environment, its start, PID-1 duties, its exit status.

The proxy is the enclave's entrypoint, so it is PID 1 (or, outside a container, a child
subreaper): every orphan of the app is reparented to it and must be reaped. One SIGCHLD
handler reaps *all* children with ``waitpid(-1, WNOHANG)`` and recognises the app by its
pid; nothing else waits for children (no ``subprocess``/asyncio child watchers, which
would race this loop). SIGINT and SIGHUP are forwarded; SIGTERM is forwarded and starts
the shutdown, after ``grace`` seconds the app is killed.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import logging
import os
import signal
from collections.abc import Mapping, Sequence
from types import FrameType
from typing import Any

from meshproxy.errors import MeshError

log = logging.getLogger("meshproxy.runtime.app")

_PR_SET_CHILD_SUBREAPER = 36
_FORWARDED = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
# Python ignores SIGPIPE and SIGXFSZ; an exec'd app must start with default dispositions.
_RESET = (*_FORWARDED, signal.SIGPIPE, signal.SIGXFSZ, signal.SIGCHLD)


def app_environment(
    base: Mapping[str, str], manifest_env: Mapping[str, bytes], ours: Mapping[str, str]
) -> dict[str, str]:
    """The app's environment: ours over the manifest's Env over the inherited one.

    Manifest values are bytes; they pass through ``os.fsdecode`` so that non-UTF-8 bytes
    reach the app unchanged. A NUL cannot be passed and is refused (naming the variable,
    never its value).
    """
    env = dict(base)
    for name, value in manifest_env.items():
        if not name or "=" in name or "\0" in name:
            raise MeshError(f"manifest Env name {name!r} cannot be an environment variable")
        if b"\0" in value:
            raise MeshError(f"manifest Env {name!r} contains a NUL byte; it cannot be passed")
        env[name] = os.fsdecode(value)
    env.update(ours)
    return env


def become_subreaper() -> bool:
    """Adopt orphaned descendants when we are not PID 1 (Linux prctl)."""
    if os.getpid() == 1:
        return True
    libc = ctypes.CDLL(None, use_errno=True)
    return bool(libc.prctl(_PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) == 0)


def exit_code(status: int) -> int:
    """A wait status as a shell reports it: the exit code, or 128+N for signal N."""
    code = os.waitstatus_to_exitcode(status)
    return 128 - code if code < 0 else code


class Supervisor:
    """Starts the app once and reports its exit; reaps every other child."""

    def __init__(self, argv: Sequence[str], env: Mapping[str, str], *, grace: float) -> None:
        if not argv:
            raise MeshError("no app to run")
        self._argv = list(argv)
        self._env = dict(env)
        self._grace = grace
        self._loop = asyncio.get_running_loop()
        self._exit: asyncio.Future[int] = self._loop.create_future()
        self._terminating: asyncio.Future[None] = self._loop.create_future()
        self._kill_timer: asyncio.TimerHandle | None = None
        self._previous_sigchld: Any = signal.SIG_DFL
        self.pid = 0

    def __repr__(self) -> str:  # the env holds the marble's private key
        return f"<Supervisor {self._argv[0]!r} pid={self.pid}>"

    def install(self) -> None:
        """Signal handlers first, so that an app dying at once is still reaped."""
        # uvloop reserves SIGCHLD for its own subprocess support (unused here), so the
        # handler is a plain Python one that hands the reaping to the loop.
        self._previous_sigchld = signal.signal(signal.SIGCHLD, self._on_sigchld)
        for sig in _FORWARDED:
            self._loop.add_signal_handler(sig, self._on_signal, sig)

    def uninstall(self) -> None:
        for sig in _FORWARDED:
            self._loop.remove_signal_handler(sig)
        signal.signal(signal.SIGCHLD, self._previous_sigchld)

    def _on_sigchld(self, signum: int, frame: FrameType | None) -> None:
        self._loop.call_soon_threadsafe(self._reap)

    def start(self) -> int:
        try:
            self.pid = os.posix_spawnp(
                self._argv[0], self._argv, self._env, setsigdef=_RESET, setsigmask=()
            )
        except OSError as exc:
            raise MeshError(
                f"cannot start the app {self._argv[0]!r}: {exc.strerror or exc}"
            ) from None
        log.info(
            "app started",
            extra={"event": "app.start", "pid": self.pid, "app": self._argv[0],
                   "env_names": len(self._env)},
        )  # fmt: skip
        self._reap()
        return self.pid

    @property
    def exited(self) -> bool:
        return self._exit.done()

    @property
    def terminating(self) -> asyncio.Future[None]:
        """Done once a SIGTERM arrived."""
        return self._terminating

    async def wait(self) -> int:
        """The app's exit code (128+N when killed by signal N)."""
        return await asyncio.shield(self._exit)

    def terminate(self) -> None:
        """SIGTERM to the app now, SIGKILL after the grace period."""
        self._send(signal.SIGTERM)
        if self._kill_timer is None and not self._exit.done():
            self._kill_timer = self._loop.call_later(self._grace, self._kill)

    def _on_signal(self, sig: signal.Signals) -> None:
        log.info("signal received", extra={"event": "signal", "signal": sig.name, "pid": self.pid})
        if sig == signal.SIGTERM:
            if not self._terminating.done():
                self._terminating.set_result(None)
            self.terminate()
        else:
            self._send(sig)

    def _send(self, sig: signal.Signals) -> None:
        if self.pid and not self._exit.done():
            with contextlib.suppress(ProcessLookupError):  # exited; SIGCHLD is on its way
                os.kill(self.pid, sig)

    def _kill(self) -> None:
        if not self._exit.done():
            log.warning(
                "app did not exit in time; killing it",
                extra={"event": "app.kill", "pid": self.pid, "grace_s": self._grace},
            )
            self._send(signal.SIGKILL)

    def _reap(self) -> None:
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            code = exit_code(status)
            if pid == self.pid and not self._exit.done():
                log.info("app exited", extra={"event": "app.exit", "pid": pid, "code": code})
                if self._kill_timer is not None:
                    self._kill_timer.cancel()
                self._exit.set_result(code)
            else:
                # an orphan of the app, or the proxy's attestation agent (``_agent``)
                log.info("child reaped", extra={"event": "app.reaped", "pid": pid, "code": code})
