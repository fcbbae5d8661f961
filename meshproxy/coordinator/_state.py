"""The coordinator's lifecycle as a table.

Rules: state only moves forward, and only along an edge of ``_TRANSITIONS``; every API
operation names the states it is allowed in (``_ALLOWED``), and anything else is a
``StateError`` that says what the coordinator is waiting for.
"""

from __future__ import annotations

import enum

from meshproxy.errors import StateError


class State(enum.IntEnum):
    # Numbers follow MarbleRun's, so status codes mean the same to its users.
    UNINITIALIZED = 0
    RECOVERY = 1
    ACCEPTING_MANIFEST = 2
    ACCEPTING_MARBLES = 3


class Event(enum.Enum):
    CREATED = "created"  # fresh start: new root CA, no manifest
    LOADED = "loaded"  # sealed state opened, manifest present
    UNSEAL_FAILED = "unseal_failed"  # sealed state exists but cannot be opened
    MANIFEST_SET = "manifest_set"
    RECOVERED = "recovered"


_TRANSITIONS: dict[tuple[State, Event], State] = {
    (State.UNINITIALIZED, Event.CREATED): State.ACCEPTING_MANIFEST,
    (State.UNINITIALIZED, Event.LOADED): State.ACCEPTING_MARBLES,
    (State.UNINITIALIZED, Event.UNSEAL_FAILED): State.RECOVERY,
    (State.ACCEPTING_MANIFEST, Event.MANIFEST_SET): State.ACCEPTING_MARBLES,
    (State.RECOVERY, Event.MANIFEST_SET): State.ACCEPTING_MARBLES,
    (State.RECOVERY, Event.RECOVERED): State.ACCEPTING_MARBLES,
}

_ALLOWED: dict[str, frozenset[State]] = {
    "quote": frozenset({State.ACCEPTING_MANIFEST, State.ACCEPTING_MARBLES, State.RECOVERY}),
    "get_manifest": frozenset({State.ACCEPTING_MARBLES}),
    "set_manifest": frozenset({State.ACCEPTING_MANIFEST, State.RECOVERY}),
    "activate": frozenset({State.ACCEPTING_MARBLES}),
    "renew": frozenset({State.ACCEPTING_MARBLES}),
    "status": frozenset(State),
    "read_secrets": frozenset({State.ACCEPTING_MARBLES}),
    "write_secrets": frozenset({State.ACCEPTING_MARBLES}),
    "update": frozenset({State.ACCEPTING_MARBLES}),
    "read_update_log": frozenset({State.ACCEPTING_MARBLES}),
    "recover": frozenset({State.RECOVERY}),
    "share_state_key": frozenset({State.ACCEPTING_MANIFEST, State.ACCEPTING_MARBLES}),
}

MESSAGES = {
    State.UNINITIALIZED: "Coordinator is starting.",
    State.RECOVERY: "Coordinator is in recovery mode: upload a recovery key, or set a new "
    "manifest (this discards the sealed state).",
    State.ACCEPTING_MANIFEST: "Coordinator is ready to accept a manifest.",
    State.ACCEPTING_MARBLES: "Coordinator is running correctly and ready to accept marbles.",
}

_WAITING = {
    State.UNINITIALIZED: "it is still starting",
    State.RECOVERY: "it is in recovery mode",
    State.ACCEPTING_MANIFEST: "no manifest has been set yet",
    State.ACCEPTING_MARBLES: "a manifest is already set (use a manifest update instead)",
}
_WAITING_FOR = {"recover": "it is not in recovery mode"}


def advance(state: State, event: Event) -> State:
    try:
        return _TRANSITIONS[(state, event)]
    except KeyError:
        raise StateError(f"event {event.value!r} is not allowed in state {state.name}") from None


def require(state: State, operation: str) -> None:
    if state not in _ALLOWED[operation]:
        why = _WAITING_FOR.get(operation, _WAITING[state])
        raise StateError(f"cannot {operation.replace('_', ' ')}: {why}")
