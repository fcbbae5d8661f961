"""The entrypoint of an enclave: activate, materialize Files, start and supervise the app.

Names are loaded on first use (PEP 562): ``meshproxy run`` serves from ``_main`` without
loading activation (``_activate``: attestation, the coordinator client, cryptography),
which runs in the short-lived agent process (``_agent``).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from meshproxy.runtime._activate import (
        activate,
        activate_with_retry,
        instance_uuid,
        quote_provider,
        write_files,
    )
    from meshproxy.runtime._app import (
        Supervisor,
        app_environment,
        become_subreaper,
        exit_code,
    )
    from meshproxy.runtime._main import (
        RunPlan,
        execute,
        make_plan,
        resolve_allow,
        run,
        serve,
    )

__all__ = [
    "RunPlan",
    "Supervisor",
    "activate",
    "activate_with_retry",
    "app_environment",
    "become_subreaper",
    "execute",
    "exit_code",
    "instance_uuid",
    "make_plan",
    "quote_provider",
    "resolve_allow",
    "run",
    "serve",
    "write_files",
]

_HOME = {
    "activate": "_activate",
    "activate_with_retry": "_activate",
    "instance_uuid": "_activate",
    "quote_provider": "_activate",
    "write_files": "_activate",
    "Supervisor": "_app",
    "app_environment": "_app",
    "become_subreaper": "_app",
    "exit_code": "_app",
    "RunPlan": "_main",
    "execute": "_main",
    "make_plan": "_main",
    "resolve_allow": "_main",
    "run": "_main",
    "serve": "_main",
}


def __getattr__(name: str) -> Any:
    try:
        module = _HOME[name]
    except KeyError:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}") from None
    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value
    return value
