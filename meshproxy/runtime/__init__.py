"""The entrypoint of an enclave: activate, materialize Files, start and supervise the app."""

from meshproxy.runtime._activate import (
    activate,
    activate_with_retry,
    instance_uuid,
    quote_provider,
    write_files,
)
from meshproxy.runtime._app import Supervisor, app_environment, become_subreaper, exit_code
from meshproxy.runtime._main import RunPlan, execute, make_plan, resolve_allow, run, serve

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
