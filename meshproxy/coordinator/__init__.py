"""The coordinator: attests marbles, issues certificates, serves the manifest.

The names below are loaded on first use (PEP 562): ``meshproxy run`` imports
``meshproxy.coordinator.client`` (and so this package) to activate, and must not carry
the coordinator's core, state and secrets modules in its memory for that.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from meshproxy._lazy import lazy_getattr

if TYPE_CHECKING:
    from meshproxy.coordinator._core import ActivationRequest, ActivationResult, CoordinatorCore
    from meshproxy.coordinator._recovery import oaep as recovery_padding
    from meshproxy.coordinator._recovery import sign_share as sign_recovery_secret
    from meshproxy.coordinator._state import State

__all__ = [
    "ActivationRequest",
    "ActivationResult",
    "CoordinatorCore",
    "State",
    "recovery_padding",
    "sign_recovery_secret",
]

_LAZY = {
    "ActivationRequest": ("_core", "ActivationRequest"),
    "ActivationResult": ("_core", "ActivationResult"),
    "CoordinatorCore": ("_core", "CoordinatorCore"),
    "State": ("_state", "State"),
    "recovery_padding": ("_recovery", "oaep"),
    "sign_recovery_secret": ("_recovery", "sign_share"),
}


__getattr__ = lazy_getattr(__name__, _LAZY)
