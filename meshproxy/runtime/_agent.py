"""The attestation agent: activation and renewal in a short-lived child process.

Attesting needs the attestation package, the coordinator client and ``cryptography``
(key generation, CSRs, quotes, chain checks): about 15 MB of modules that would stay in
the long-lived proxy's memory for good once imported (issue 3: the proxy under 40 MB at
idle). So ``meshproxy run`` starts ``python -m meshproxy.runtime._agent activate|renew``
with a JSON request on stdin; the agent measures the enclave, generates a fresh key,
attests, and writes the result as JSON on stdout (PEM certificates, the key, the
manifest's Files/Env/Argv, the mesh policy, the lease) and exits. Its log lines go to the
proxy's stderr. The key crosses a pipe between the two processes of one enclave, nothing
else; a failure comes back as ``{"error", "kind", "http_status"}`` and is raised in the
proxy as the same ``MeshError`` class.
"""

from __future__ import annotations

import base64
import contextlib
import dataclasses
import json
import logging
import os
import signal
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from meshproxy import errors
from meshproxy._pipes import read_to_end, write_all
from meshproxy._redact import Secret
from meshproxy.errors import ConnectError, MeshError

if TYPE_CHECKING:
    from meshproxy.config import MarbleConfig
    from meshproxy.runtime._activated import Activated, AgentRenewal, MeshView, Renewal
    from meshproxy.runtime._lease import Lease
    from meshproxy.tls import TLSIdentity

__all__ = ["Activated", "AgentRenewal", "Forked", "MeshView", "Pending", "Renewal"]

# Loaded by the proxy's side on first use, not at import: ``meshproxy run`` imports this
# module before forking the agent, and the agent needs neither asyncio (``_renew``) nor
# the TLS backends nor what the proxy serves with (``_activated``, re-exported here); the
# sooner the fork, the sooner attesting starts.
_ACTIVATED = ("Activated", "AgentRenewal", "MeshView", "Renewal")


def __getattr__(name: str) -> Any:
    if name in _ACTIVATED:
        from meshproxy.runtime import _activated

        return getattr(_activated, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


log = logging.getLogger("meshproxy.runtime")

AGENT_TIMEOUT_SLACK = 30.0  # beyond the activation timeout, before the agent is killed


# -- the proxy's side -------------------------------------------------------------------------
class Pending:
    """An agent at work: started early, so that it attests while the proxy loads its own
    modules and config (two cores do both at once), read with ``result``."""

    def __init__(self, mode: str, request: Mapping[str, Any]) -> None:
        import subprocess

        self.mode = mode
        argv = [sys.executable, "-m", "meshproxy.runtime._agent", mode]
        try:
            self._proc = subprocess.Popen(
                argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, close_fds=True
            )
        except OSError as exc:
            raise MeshError(f"cannot start the attestation agent: {exc.strerror or exc}") from None
        self._input = json.dumps(request).encode()
        self._done = False

    def result(self, timeout: float) -> dict[str, Any]:
        import subprocess

        try:
            out, _ = self._proc.communicate(self._input, timeout=timeout)
        except subprocess.TimeoutExpired:
            self.cancel()
            raise ConnectError(f"the attestation agent did not finish in {timeout:.0f}s") from None
        self._done = True
        return _answer(self.mode, out)

    def cancel(self) -> None:
        """Stop the agent if it still works (idempotent; a no-op once it answered)."""
        if self._done:
            return
        self._done = True
        if self._proc.poll() is None:
            self._proc.kill()
        self._proc.communicate()


class Forked(Pending):
    """The agent as a fork of this process, for the activation at start: the process is
    still single-threaded and small then, and a fork starts attesting at once with what
    is already imported (a new interpreter would cost a start and the same imports again).
    The proxy (the parent) never imports what the child loads to attest.

    Without ``cfg`` the agent is forked before the config is loaded: it loads its
    modules while the proxy parses the config (PyYAML stays in the proxy), then gets it
    from ``configure`` as JSON. For simulation the proxy also measures the package
    meanwhile and hands over the digest (attestation._tree.send_digest)."""

    def __init__(
        self, mode: str, request: Mapping[str, Any], cfg: MarbleConfig | None = None
    ) -> None:
        import meshproxy.attestation._tree  # noqa: F401 (both sides use it: loaded once)

        self.mode = mode
        self._done = False
        read, write = os.pipe()
        config = os.pipe() if cfg is None else None
        digest = os.pipe()
        pid = os.fork()
        if pid == 0:  # the agent
            code = 0
            try:
                os.close(read)
                os.close(digest[1])
                if config is not None:
                    os.close(config[1])
                _die_with_parent()
                doc = _agent_side(mode, request, cfg, config and config[0], digest[0])
                # Closed once written: the proxy reads to the end of the pipe, so it gets
                # that now, not once this process is torn down (unmapping takes ms).
                write_all(write, json.dumps(doc).encode())
            except Exception:  # a bug: say so; the proxy says "failed without an answer"
                logging.getLogger("meshproxy.runtime").exception("attestation agent failed")
                code = 70
            finally:
                os._exit(code)  # no atexit handlers, no flushing the parent's buffers
        os.close(write)
        os.close(digest[0])
        self._pid = pid
        self._read = read
        self._digest: int | None = digest[1]
        self._config: int | None = None
        if config is not None:
            os.close(config[0])
            self._config = config[1]
        else:
            assert cfg is not None
            self._send_digest(cfg)

    def configure(self, cfg: MarbleConfig, document: Mapping[str, Any]) -> None:
        """Hand the agent forked without a config this one (``document``: what
        ``config.load_marble_document`` made it of), then the package's digest."""
        fd, self._config = self._config, None
        if fd is not None:
            message = b""
            with contextlib.suppress(TypeError, ValueError):  # not JSON: the agent reads the file
                text = json.dumps(dict(document))
                if json.loads(text) == dict(document):  # the very values (no int keys...)
                    message = text.encode()
            write_all(fd, message)
        self._send_digest(cfg)

    def _send_digest(self, cfg: MarbleConfig) -> None:
        fd, self._digest = self._digest, None
        if fd is None:
            return
        if cfg.attestation.provider != "simulation":
            os.close(fd)
            return
        from meshproxy.attestation import _tree

        _tree.send_digest(_tree.package_dir(), fd)

    def result(self, timeout: float) -> dict[str, Any]:
        import selectors

        # Not configured: the agent reads the config file itself (and measures itself).
        for fd in (self._config, self._digest):
            if fd is not None:
                os.close(fd)
        self._config = self._digest = None
        chunks = []
        with selectors.DefaultSelector() as sel:
            sel.register(self._read, selectors.EVENT_READ)
            deadline = time.monotonic() + timeout
            while True:
                left = deadline - time.monotonic()
                if left <= 0 or not sel.select(left):
                    self.cancel()
                    raise ConnectError(
                        f"the attestation agent did not finish in {timeout:.0f}s"
                    ) from None
                chunk = os.read(self._read, 65536)
                if not chunk:
                    break
                chunks.append(chunk)
        self._finish(wait=False)
        return _answer(self.mode, b"".join(chunks))

    def cancel(self) -> None:
        if not self._done:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self._pid, signal.SIGKILL)
            self._finish()

    def _finish(self, *, wait: bool = True) -> None:
        """Close the pipes and reap the agent; ``wait=False`` when it has answered and is
        exiting: not waited for here, it is reaped once exited (now, or by the app's
        supervisor, which reaps every child of the proxy: ``_app.Supervisor``)."""
        if self._done:
            return
        self._done = True
        os.close(self._read)
        for fd in (self._config, self._digest):
            if fd is not None:
                os.close(fd)
        self._config = self._digest = None
        with contextlib.suppress(ChildProcessError):
            os.waitpid(self._pid, 0 if wait else os.WNOHANG)


def begin_activation(config: Path, cfg: MarbleConfig | None = None) -> Forked:
    """Start activating in the agent now; ``activate(pending=...)`` reads the result.
    ``cfg``: ``config`` already loaded (and logging set up) by the caller; the agent, a
    fork, has it without parsing the file again. Without it, the caller loads it while
    the agent loads its modules, and hands it over with ``configure``."""
    return Forked("activate", {"config": str(config)}, cfg)


def activate(config: Path, timeout: float, *, pending: Pending | None = None) -> Activated:
    """Activate in the agent (blocking; with the config's retries)."""
    from meshproxy.runtime._activated import Activated
    from meshproxy.runtime._lease import Lease

    pending = pending or begin_activation(config)
    doc = pending.result(timeout + AGENT_TIMEOUT_SLACK)
    try:
        return Activated(
            uuid=str(doc["uuid"]),
            identity=_identity(doc),
            root_pem=str(doc["root_pem"]).encode(),
            files={},  # written by the agent
            env={k: base64.b64decode(v) for k, v in doc["env"].items()},
            argv=tuple(str(a) for a in doc["argv"]),
            mesh=_mesh(doc["mesh"]),
            lease=Lease(**doc["lease"]),
            simulated=bool(doc["simulated"]),
            sealing_key=(
                Secret(base64.b64decode(doc["sealing_key"])) if doc.get("sealing_key") else None
            ),
        )
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise MeshError(f"the attestation agent answered malformed JSON: {exc}") from None


def renew(config: Path, uuid: str, root_pem: bytes, timeout: float) -> tuple[Lease, Renewal]:
    """Renew in the agent (blocking): a fresh key, CSR and quote."""
    request = {"config": str(config), "uuid": uuid, "root_pem": root_pem.decode()}
    from meshproxy.runtime._activated import Renewal
    from meshproxy.runtime._lease import Lease

    doc = _call("renew", request, timeout + AGENT_TIMEOUT_SLACK)
    try:
        return Lease(**doc["lease"]), Renewal(_identity(doc), _mesh(doc["mesh"]))
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise MeshError(f"the attestation agent answered malformed JSON: {exc}") from None


def _call(mode: str, request: Mapping[str, Any], timeout: float) -> dict[str, Any]:
    return Pending(mode, request).result(timeout)


def _answer(mode: str, stdout: bytes) -> dict[str, Any]:
    try:
        doc = json.loads(stdout)
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise MeshError(
            f"the attestation agent ({mode}) failed without an answer; see its log lines above"
        ) from None
    if not isinstance(doc, dict):
        raise MeshError("the attestation agent answered malformed JSON")
    if "error" in doc:
        raise _error(doc)
    return doc


def _error(doc: Mapping[str, Any]) -> MeshError:
    kind = getattr(errors, str(doc.get("kind")), None)
    message = str(doc["error"])
    if kind is errors.CoordinatorError:
        return errors.CoordinatorError(message, http_status=int(doc.get("http_status") or 0))
    if kind is errors.AttestationError:
        return errors.AttestationError(message, check=str(doc.get("check") or "quote"))
    if isinstance(kind, type) and issubclass(kind, MeshError):
        try:
            made = kind(message)
        except TypeError:
            made = MeshError(message)
        return made
    return MeshError(message)


def _identity(doc: Mapping[str, Any]) -> TLSIdentity:
    from meshproxy.tls import TLSIdentity

    return TLSIdentity(
        chain_pem=str(doc["chain_pem"]).encode(),
        key_pem=Secret(str(doc["key_pem"]).encode()),
        trust_pem=str(doc["trust_pem"]).encode(),
    )


def _mesh(doc: Mapping[str, Any]) -> MeshView:
    from meshproxy.runtime._activated import MeshView

    return MeshView(
        trust_domain=str(doc["trust_domain"]),
        allow={str(k): tuple(str(x) for x in v) for k, v in doc["allow"].items()},
        routes={str(k): tuple(v) for k, v in doc["routes"].items()},
    )


# -- the agent's side -------------------------------------------------------------------------
def main(argv: list[str]) -> int:
    if len(argv) != 1 or argv[0] not in ("activate", "renew"):
        print("usage: python -m meshproxy.runtime._agent activate|renew", file=sys.stderr)
        return 2
    doc = _handle(argv[0], json.load(sys.stdin))
    sys.stdout.write(json.dumps(doc))
    sys.stdout.flush()
    return 0 if "error" not in doc else 1


def _agent_side(
    mode: str,
    request: Mapping[str, Any],
    cfg: MarbleConfig | None,
    config_fd: int | None,
    digest_fd: int,
) -> dict[str, Any]:
    """The forked agent: with ``config_fd``, load the modules attesting needs while the
    proxy loads the config, then read it (nothing: read the file here, as the renewal
    agent does, and report what is wrong with it)."""
    from meshproxy._log import setup as setup_logging

    if config_fd is not None:
        _preload()
        data = read_to_end(config_fd)
        if data:
            from meshproxy.config._marble import from_marble_document

            try:
                cfg = from_marble_document(json.loads(data))
            except MeshError:
                cfg = None  # the proxy refused it too; _handle says why, if anyone asks
            else:
                setup_logging(cfg.log.level, cfg.log.format)
    log.debug("attestation agent configured", extra={"event": "agent.config"})
    if cfg is not None and cfg.attestation.provider == "simulation":
        from meshproxy.attestation import _tree

        _tree.expect_digest(_tree.package_dir(), digest_fd)
    else:
        os.close(digest_fd)
    return _handle(mode, request, cfg)


def _preload() -> None:
    """What attesting loads, in the order it does, before the config is there."""
    import meshproxy.attestation._enclave
    import meshproxy.attestation._platform
    import meshproxy.coordinator.client
    import meshproxy.pki
    import meshproxy.runtime._activate
    import meshproxy.runtime._lease  # noqa: F401


def _handle(
    mode: str, request: Mapping[str, Any], cfg: MarbleConfig | None = None
) -> dict[str, Any]:
    from meshproxy._log import setup as setup_logging
    from meshproxy.config import load_marble_config

    try:
        if cfg is None:
            cfg = load_marble_config(request["config"])
            setup_logging(cfg.log.level, cfg.log.format)
        return _activate(cfg) if mode == "activate" else _renew(cfg, request)
    except MeshError as exc:
        return {"error": str(exc), "kind": type(exc).__name__,
                "http_status": getattr(exc, "http_status", None),
                "check": getattr(exc, "check", None)}  # fmt: skip


def _activate(cfg: Any) -> dict[str, Any]:
    from meshproxy.pki import cert_to_pem, certs_to_pem, generate_key, key_to_pem
    from meshproxy.runtime._activate import activate as activate_now
    from meshproxy.runtime._activate import quote_provider, write_files
    from meshproxy.runtime._lease import lease_of

    provider = quote_provider(cfg)
    key = generate_key()
    act = activate_now(cfg, key, provider)
    cfg.workdir.mkdir(mode=0o700, parents=True, exist_ok=True)
    os.chmod(cfg.workdir, 0o700)
    write_files(cfg.files_root, act.files)
    return {
        "uuid": act.uuid,
        "key_pem": key_to_pem(key).reveal().decode(),
        "chain_pem": certs_to_pem([act.leaf, act.intermediate]).decode(),
        "trust_pem": cert_to_pem(act.intermediate).decode(),
        "root_pem": cert_to_pem(act.root).decode(),
        "env": {k: base64.b64encode(v).decode() for k, v in act.env.items()},
        "argv": list(act.argv),
        "mesh": _mesh_doc(act.mesh),
        "lease": dataclasses.asdict(lease_of(act.leaf, act.intermediate)),
        "simulated": act.simulated,
        # Under Gramine the proxy installs it in its own process too: the app is its child,
        # and the agent is another enclave process (_main._install_sealing_key).
        "sealing_key": (
            base64.b64encode(act.sealing_key.reveal()).decode() if act.sealing_key else None
        ),
    }


def _renew(cfg: Any, request: Mapping[str, Any]) -> dict[str, Any]:
    import uuid as uuidlib

    from meshproxy.coordinator.client import renew as renew_now
    from meshproxy.pki import cert_from_pem, cert_to_pem, certs_to_pem, generate_key, key_to_pem
    from meshproxy.runtime._activate import ATTEMPT_TIMEOUT, quote_provider
    from meshproxy.runtime._lease import lease_of

    provider = quote_provider(cfg)
    key = generate_key()
    r = renew_now(
        str(cfg.coordinator.address), marble_type=cfg.marble.type,
        instance=uuidlib.UUID(str(request["uuid"])), key=key, dns_names=cfg.marble.dns_names,
        provider=provider, root=cert_from_pem(str(request["root_pem"]).encode(), "root"),
        timeout=ATTEMPT_TIMEOUT,
    )  # fmt: skip
    return {
        "key_pem": key_to_pem(key).reveal().decode(),
        "chain_pem": certs_to_pem([r.leaf, r.intermediate]).decode(),
        "trust_pem": cert_to_pem(r.intermediate).decode(),
        "mesh": _mesh_doc(r.mesh),
        "lease": dataclasses.asdict(lease_of(r.leaf, r.intermediate)),
    }


def _mesh_doc(mesh: Any) -> dict[str, Any]:
    return {
        "trust_domain": mesh.trust_domain,
        "allow": {k: list(v) for k, v in mesh.allow.items()},
        "routes": {
            k: [{"path": r.path, "path_prefix": r.path_prefix, "methods": list(r.methods),
                 "allow": list(r.allow)} for r in rules]
            for k, rules in mesh.routes.items()
        },
    }  # fmt: skip


def _die_with_parent() -> None:
    """The agent works for one proxy: when that proxy dies (a SIGTERM during a long
    activation), the agent goes too instead of finishing an attestation nobody reads.
    (Linux ties this to the spawning thread: the proxy spawns from its main thread or
    from the event loop's executor threads, which live as long as the proxy serves.)"""
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)


_PR_SET_PDEATHSIG = 1

if __name__ == "__main__":
    import gc

    gc.disable()  # a short-lived process: collecting while it loads is work for nothing
    os.umask(0o077)
    _die_with_parent()
    sys.exit(main(sys.argv[1:]))
