"""The one exception tree of meshproxy.

Every error a user can cause is a ``MeshError``: the CLI prints its message (never a
traceback) and exits with ``exit_code``. Messages say what was wrong, where, and what to do.
Anything else escaping to the CLI is a bug and is reported as such.
"""

from __future__ import annotations


class MeshError(Exception):
    """Root of all meshproxy errors. ``str(err)`` is the message shown to a user."""

    exit_code = 1


class ConfigError(MeshError):
    """A configuration file (marble config, enclave description) is invalid."""

    exit_code = 2


class ManifestError(MeshError):
    """A manifest is malformed or violates a rule; the message names the key path."""

    exit_code = 2


class UsageError(MeshError):
    """A command was called with wrong arguments."""

    exit_code = 2


class PKIError(MeshError):
    """A certificate, key or CSR is malformed, expired, foreign or does not verify."""


class AttestationError(MeshError):
    """A quote is malformed or does not verify; ``check`` names the failing check."""

    def __init__(self, message: str, *, check: str = "quote") -> None:
        super().__init__(message)
        self.check = check


class PolicyError(MeshError):
    """Evidence verified but does not satisfy a policy (package, mesh allow-list, role)."""


class StateError(MeshError):
    """An operation is not allowed in the coordinator's current state."""


class StoreError(MeshError):
    """Persistent state could not be read or written."""


class CoordinatorError(MeshError):
    """The coordinator answered with an error; ``http_status`` is the wire status."""

    def __init__(self, message: str, *, http_status: int = 0) -> None:
        super().__init__(message)
        self.http_status = http_status


class ConnectError(MeshError):
    """A peer (coordinator, upstream) could not be reached or spoke garbage."""


class NativeUnavailable(MeshError):
    """MESHPROXY_NATIVE=require but the compiled TLS engine cannot be loaded."""
