"""The coordinator: attests marbles, issues certificates, serves the manifest."""

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
