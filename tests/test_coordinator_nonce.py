"""Activation nonces: stateless, recognized by every replica of a cluster, used once."""

from __future__ import annotations

import copy
import dataclasses
import json
from datetime import timedelta
from pathlib import Path

import pytest
from test_coordinator_core import MANIFEST, NOW, Env

from meshproxy._redact import Secret
from meshproxy.coordinator import CoordinatorCore
from meshproxy.coordinator._nonce import SIZE, LocalUsedNonces, NonceBook, nonce_id
from meshproxy.errors import PolicyError

ROOT_SECRET = Secret(b"r" * 32)


def test_a_nonce_checks_until_it_expires_and_not_after() -> None:
    book = NonceBook(shared=True)
    nonce = book.issue(ROOT_SECRET, NOW)
    assert len(nonce) == SIZE
    assert book.check(ROOT_SECRET, nonce, NOW + timedelta(seconds=59)) > NOW
    with pytest.raises(PolicyError, match="unknown, used or expired"):
        book.check(ROOT_SECRET, nonce, NOW + timedelta(seconds=61))


@pytest.mark.parametrize("position", [0, 3, 12, SIZE - 1])
def test_a_tampered_nonce_is_refused(position: int) -> None:
    book = NonceBook(shared=True)
    nonce = bytearray(book.issue(ROOT_SECRET, NOW))
    nonce[position] ^= 0x01
    with pytest.raises(PolicyError, match="unknown"):
        book.check(ROOT_SECRET, bytes(nonce), NOW)


def test_replicas_share_nonces_but_single_coordinators_do_not() -> None:
    a, b = NonceBook(shared=True), NonceBook(shared=True)
    b.check(ROOT_SECRET, a.issue(ROOT_SECRET, NOW), NOW)  # another replica's nonce
    with pytest.raises(PolicyError):  # another cluster (another root secret)
        b.check(Secret(b"x" * 32), a.issue(ROOT_SECRET, NOW), NOW)
    alone, restarted = NonceBook(shared=False), NonceBook(shared=False)
    with pytest.raises(PolicyError):  # a restarted coordinator forgets its old nonces
        restarted.check(ROOT_SECRET, alone.issue(ROOT_SECRET, NOW), NOW)


def test_a_nonce_from_the_future_is_refused() -> None:
    late_clock = NonceBook(shared=True)
    nonce = late_clock.issue(ROOT_SECRET, NOW + timedelta(minutes=10))
    with pytest.raises(PolicyError):
        NonceBook(shared=True).check(ROOT_SECRET, nonce, NOW)


def test_local_claims_are_single_use_and_forgotten_after_expiry() -> None:
    used = LocalUsedNonces()
    ids = [nonce_id(b"a"), nonce_id(b"b")]
    assert used.claim(ids, NOW + timedelta(seconds=60), NOW) == set(ids)
    assert used.claim([ids[0], nonce_id(b"c")], NOW + timedelta(seconds=60), NOW) == {
        nonce_id(b"c")
    }
    later = NOW + timedelta(seconds=61)
    assert used.claim([ids[0]], later + timedelta(seconds=60), later) == {ids[0]}


def _replica(env: Env, used: LocalUsedNonces) -> CoordinatorCore:
    """Another replica of ``env``'s cluster: same state, shared claims."""
    return CoordinatorCore(
        copy.copy(env.core.persistent),
        commit=env.commit,
        provider=env.core._provider,
        anchors=env.core._anchors,
        simulation=True,
        refresh=lambda: None,
        used_nonces=used,
    )


def test_a_marble_activates_at_another_replica_than_the_one_that_gave_its_nonce(
    tmp_path: Path,
) -> None:
    env = Env(tmp_path)
    env.core.set_manifest(json.dumps(MANIFEST).encode(), now=NOW)
    used = LocalUsedNonces()
    a, b = _replica(env, used), _replica(env, used)
    env.core = a  # env.request asks replica a for the nonce
    req = env.request("frontend")
    result = b.activate(req, now=NOW)
    assert b"BEGIN CERTIFICATE" in result.leaf_pem
    with pytest.raises(PolicyError, match="nonce is unknown, used or expired"):
        a.activate(req, now=NOW)  # replayed at the replica that issued it
    with pytest.raises(PolicyError, match="nonce is unknown, used or expired"):
        b.activate(req, now=NOW)


def test_a_refused_request_does_not_burn_its_nonce(tmp_path: Path) -> None:
    env = Env(tmp_path)
    env.core.set_manifest(json.dumps(MANIFEST).encode(), now=NOW)
    good = env.request("frontend")
    quote = bytearray(good.quote)
    quote[100] ^= 1  # inside the signed report body
    tampered = dataclasses.replace(good, quote=bytes(quote))
    with pytest.raises(PolicyError, match="quote verification failed"):
        env.core.activate(tampered, now=NOW)
    env.core.activate(good, now=NOW)
