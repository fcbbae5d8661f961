"""The coordinator state machine: every edge of the table, and refusals off the table."""

from __future__ import annotations

import pytest

from meshproxy.coordinator._state import Event, State, advance, require
from meshproxy.errors import StateError


@pytest.mark.parametrize(
    ("state", "event", "expected"),
    [
        (State.UNINITIALIZED, Event.CREATED, State.ACCEPTING_MANIFEST),
        (State.UNINITIALIZED, Event.LOADED, State.ACCEPTING_MARBLES),
        (State.UNINITIALIZED, Event.UNSEAL_FAILED, State.RECOVERY),
        (State.ACCEPTING_MANIFEST, Event.MANIFEST_SET, State.ACCEPTING_MARBLES),
        (State.RECOVERY, Event.MANIFEST_SET, State.ACCEPTING_MARBLES),
        (State.RECOVERY, Event.RECOVERED, State.ACCEPTING_MARBLES),
    ],
)
def test_table_edges(state: State, event: Event, expected: State) -> None:
    assert advance(state, event) is expected


@pytest.mark.parametrize(
    ("state", "event"),
    [
        (State.ACCEPTING_MARBLES, Event.MANIFEST_SET),
        (State.ACCEPTING_MARBLES, Event.CREATED),
        (State.ACCEPTING_MANIFEST, Event.RECOVERED),
        (State.UNINITIALIZED, Event.MANIFEST_SET),
    ],
)
def test_off_table_is_an_error(state: State, event: Event) -> None:
    with pytest.raises(StateError, match=event.value):
        advance(state, event)


def test_operations_name_what_the_coordinator_waits_for() -> None:
    require(State.ACCEPTING_MARBLES, "activate")
    with pytest.raises(StateError, match="no manifest has been set yet"):
        require(State.ACCEPTING_MANIFEST, "activate")
    with pytest.raises(StateError, match="already set"):
        require(State.ACCEPTING_MARBLES, "set_manifest")
    for state in State:
        require(state, "status")
