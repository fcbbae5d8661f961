"""Group commit: activations that arrive together share one sealed commit, and none of the
counted ones is answered unless that commit succeeded."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
from test_coordinator_core import MANIFEST, NOW, Env

from meshproxy.coordinator import ActivationResult
from meshproxy.errors import PolicyError, StoreError


@pytest.fixture
def env(tmp_path: Path) -> Env:
    doc = copy.deepcopy(MANIFEST)
    doc["Marbles"]["backend"]["MaxActivations"] = 3
    e = Env(tmp_path)
    e.core.set_manifest(json.dumps(doc).encode(), now=NOW)
    e.commits.clear()
    return e


def test_a_batch_is_one_commit_and_max_activations_holds_inside_it(env: Env) -> None:
    batch = [(env.request("backend"), NOW) for _ in range(5)] + [(env.request("frontend"), NOW)]
    results = env.core.activate_many(batch)
    assert len(env.commits) == 1
    assert json.loads(env.commits[0])["activations"] == {"backend": 3}
    assert [isinstance(r, ActivationResult) for r in results] == [True] * 3 + [False] * 2 + [True]
    assert all("MaxActivations (3)" in str(r) for r in results[3:5])
    assert env.core.activation_counts() == {"backend": 3}


def test_a_failed_group_commit_fails_every_counted_activation_of_the_batch(env: Env) -> None:
    env.core.activate(env.request("backend"), now=NOW)
    env.fail_commit = True
    batch = [(env.request("backend"), NOW), (env.request("frontend"), NOW),
             (env.request("backend"), NOW)]  # fmt: skip
    results = env.core.activate_many(batch)
    assert isinstance(results[0], StoreError)
    assert isinstance(results[2], StoreError)
    assert isinstance(results[1], ActivationResult)  # nothing to commit for it
    assert env.core.activation_counts() == {"backend": 1}  # memory kept the old state
    env.fail_commit = False
    again = env.core.activate_many([(env.request("backend"), NOW) for _ in range(3)])
    assert [isinstance(r, ActivationResult) for r in again] == [True, True, False]
    assert isinstance(again[2], PolicyError)
    assert json.loads(env.commits[-1])["activations"] == {"backend": 3}


def test_a_refused_request_in_a_batch_does_not_hold_up_the_others(env: Env) -> None:
    good = env.request("backend")
    replayed = env.request("frontend")
    env.core.activate(replayed, now=NOW)
    results = env.core.activate_many([(replayed, NOW), (good, NOW)])
    assert isinstance(results[0], PolicyError)
    assert "nonce" in str(results[0])
    assert isinstance(results[1], ActivationResult)
