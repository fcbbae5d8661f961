"""The coordinator: attests marbles, issues certificates, serves the manifest."""

from meshproxy.coordinator._core import ActivationRequest, ActivationResult, CoordinatorCore
from meshproxy.coordinator._state import State

__all__ = ["ActivationRequest", "ActivationResult", "CoordinatorCore", "State"]
