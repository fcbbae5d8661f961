"""The renewal schedule (a pure function) and the Renewer's reactions, without a
coordinator: the I/O is passed in (the integration test runs the real thing)."""

from __future__ import annotations

import asyncio
import logging
import time
from pathlib import Path

import pytest

from meshproxy.errors import ConnectError, CoordinatorError
from meshproxy.runtime._renew import Lease, Renewed, Renewer, Step, next_step

LEASE = Lease(not_before=1000.0, not_after=2000.0, intermediate="aa")


def step(now: float, **kw: object) -> Step:
    args: dict[str, object] = {"update_seen": False, "expired": False, "retry_at": None,
                               "poll_at": now + 5}  # fmt: skip
    args.update(kw)
    return next_step(now, LEASE, **args)  # type: ignore[arg-type]


def test_renewal_is_due_at_70_percent_of_the_lifetime() -> None:
    assert LEASE.renew_at() == 1700.0
    assert step(1100.0) == Step("wait", 5.0)  # the next poll comes first
    assert step(1698.0) == Step("wait", 2.0)  # then the renewal time
    assert step(1700.0) == Step("renew")


def test_a_poll_when_due_and_an_update_renews_at_once() -> None:
    assert step(1100.0, poll_at=1100.0) == Step("poll")
    assert step(1100.0, update_seen=True) == Step("renew")


def test_a_failed_renewal_waits_for_its_retry_time_then_expiry_cuts_off() -> None:
    assert step(1800.0, retry_at=1810.0) == Step("wait", 5.0)  # poll still runs meanwhile
    assert step(1800.0, retry_at=1810.0, update_seen=True) == Step("wait", 10.0)
    assert step(1810.0, retry_at=1810.0) == Step("renew")
    assert step(1995.0, retry_at=2030.0, update_seen=True) == Step("wait", 5.0)  # expiry
    assert step(2000.0, retry_at=2030.0) == Step("expire")
    # expired: no more polls, renewal retried (a later success serves again)
    assert step(2001.0, retry_at=2030.0, expired=True) == Step("wait", 29.0)
    assert step(2030.0, retry_at=2030.0, expired=True) == Step("renew")


class Fake:
    """The Renewer's I/O, scripted: each renew() takes the next outcome."""

    def __init__(self, outcomes: list[object], intermediate: str | None = None) -> None:
        self.outcomes = outcomes
        self.intermediate = intermediate
        self.applied: list[Renewed] = []
        self.cut: list[float] = []
        self.renew_calls: list[float] = []

    async def renew(self) -> Renewed:
        self.renew_calls.append(time.time())
        outcome = self.outcomes.pop(0)
        if isinstance(outcome, Exception):
            raise outcome
        assert isinstance(outcome, Renewed)
        return outcome

    async def current(self) -> str | None:
        return self.intermediate

    async def apply(self, renewed: Renewed) -> None:
        self.applied.append(renewed)

    async def cut_off(self) -> None:
        self.cut.append(time.time())


def run_for(renewer: Renewer, seconds: float) -> None:
    async def main() -> None:
        task = asyncio.ensure_future(renewer.run())
        await asyncio.sleep(seconds)
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)

    asyncio.run(main())


def test_a_new_intermediate_seen_by_the_poll_renews_promptly() -> None:
    now = time.time()
    lease = Lease(now - 1, now + 3600, "old")
    renewed = Renewed(Lease(now, now + 3600, "new"), payload="identity")
    fake = Fake([renewed], intermediate="new")
    renewer = Renewer(lease, renew=fake.renew, current_intermediate=fake.current,
                      apply=fake.apply, cut_off=fake.cut_off, poll=0.05)  # fmt: skip
    run_for(renewer, 0.5)
    assert fake.applied == [renewed]
    assert renewer.lease.intermediate == "new"
    assert len(fake.renew_calls) == 1  # the poll now matches: no second renewal
    assert fake.cut == []


def test_a_refused_marble_retries_loudly_is_cut_off_at_expiry_and_serves_again(
    caplog: pytest.LogCaptureFixture,
) -> None:
    now = time.time()
    lease = Lease(now - 7, now + 0.6, "old")  # already past 70 %
    refused = CoordinatorError("SecurityVersion 1 is below 2", http_status=403)
    back = Renewed(Lease(now, now + 3600, "new"), payload="identity")
    fake = Fake([refused, ConnectError("unreachable"), refused, back])
    renewer = Renewer(lease, renew=fake.renew, current_intermediate=fake.current,
                      apply=fake.apply, cut_off=fake.cut_off, poll=0.05)  # fmt: skip
    with caplog.at_level(logging.INFO, logger="meshproxy.runtime.renew"):
        run_for(renewer, 8.5)  # retries after 1 s, 2 s, 4 s
    events = [getattr(r, "event", None) for r in caplog.records]
    assert events.count("renewal.refused") == 2
    assert events.count("renewal.retry") == 1
    refused_line = next(r for r in caplog.records if getattr(r, "event", "") == "renewal.refused")
    assert refused_line.levelno == logging.ERROR
    assert "SecurityVersion 1 is below 2" in refused_line.reason  # type: ignore[attr-defined]
    assert len(fake.cut) == 1
    assert fake.cut[0] >= lease.not_after
    assert fake.applied == [back]  # the fourth attempt succeeded, after the cut-off
    assert fake.renew_calls[-1] > fake.cut[0]
    assert not renewer.expired
    assert "renewal.done" in events


def test_a_backdated_leaf_counts_its_lifetime_from_when_it_was_received() -> None:
    import uuid
    from datetime import UTC, datetime, timedelta

    from meshproxy import pki
    from meshproxy.runtime._renew import lease_of

    now = datetime.now(UTC)
    root = pki.create_root(now=now, dns_names=[], simulated=True, key=pki.generate_key())
    inter = pki.create_intermediate(root, now=now, simulated=True, key=pki.generate_key())
    key = pki.generate_key()
    leaf = pki.issue_leaf(
        inter, pki.make_csr(key, "web", []), trust_domain="t.test", marble_type="web",
        instance=uuid.uuid4(), dns_names=[], lifetime=timedelta(minutes=1), now=now,
        simulated=True,
    )  # fmt: skip
    assert leaf.not_valid_before_utc < now - timedelta(minutes=1)  # backdated for skew
    lease = lease_of(leaf, inter.cert, now=now.timestamp())
    assert lease.not_before == now.timestamp()
    assert lease.renew_at() == pytest.approx(now.timestamp() + 42, abs=1)
    other = pki.create_intermediate(root, now=now, simulated=True, key=pki.generate_key())
    assert lease.intermediate != lease_of(leaf, other.cert).intermediate


def test_a_renewal_the_data_plane_cannot_install_is_retried() -> None:
    from meshproxy.errors import PKIError

    now = time.time()
    lease = Lease(now - 7, now + 3.1, "old")  # past 70 %
    first = Renewed(Lease(now, now + 3600, "bad"), payload="unloadable")
    second = Renewed(Lease(now, now + 3600, "new"), payload="identity")
    fake = Fake([first, second])
    calls: list[object] = []

    async def apply(renewed: Renewed) -> None:
        calls.append(renewed.payload)
        if renewed.payload == "unloadable":
            raise PKIError("certificate chain and private key do not load")

    renewer = Renewer(lease, renew=fake.renew, current_intermediate=fake.current,
                      apply=apply, cut_off=fake.cut_off, poll=0.05)  # fmt: skip
    run_for(renewer, 1.5)
    assert calls == ["unloadable", "identity"]
    assert renewer.lease.intermediate == "new"  # the failed one was never taken as current


def test_the_update_poll_is_configured_and_bounded(tmp_path: Path) -> None:
    import yaml

    from meshproxy.config import load_marble_config
    from meshproxy.errors import ConfigError

    def load(poll: object) -> float:
        coordinator = {"address": "127.0.0.1:2001"}
        if poll is not None:
            coordinator["update_poll"] = poll  # type: ignore[assignment]
        doc = {"coordinator": coordinator, "marble": {"type": "web"},
               "attestation": {"provider": "simulation", "enclave": "e.json"},
               "workdir": "run"}  # fmt: skip
        path = tmp_path / "marble.yaml"
        path.write_text(yaml.safe_dump(doc))
        return load_marble_config(path).coordinator.update_poll

    assert load(None) == 10.0
    assert load("30s") == 30.0
    with pytest.raises(ConfigError, match=r"coordinator\.update_poll: must be between 1s and 1h"):
        load("100ms")


def test_a_manifest_update_changes_who_may_call_new_connections(tmp_path: Path) -> None:
    import ssl

    import yaml

    from meshproxy.config import load_marble_config
    from meshproxy.proxy import ConnectionSet, InboundListener, InboundSpec
    from meshproxy.runtime._agent import MeshView
    from meshproxy.runtime._main import _set_allow

    doc = {
        "coordinator": {"address": "127.0.0.1:2001"}, "marble": {"type": "web"},
        "attestation": {"provider": "simulation", "enclave": "e.json"}, "workdir": "run",
        "inbound": [{"name": "open", "listen": "127.0.0.1:0"},
                    {"name": "narrow", "listen": "127.0.0.1:1", "allow": ["a", "b"]},
                    {"name": "pub", "listen": "127.0.0.1:2", "clients": "public"}],
    }  # fmt: skip
    (tmp_path / "marble.yaml").write_text(yaml.safe_dump(doc))
    cfg = load_marble_config(tmp_path / "marble.yaml")
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    listeners = []
    for i in cfg.inbound:
        allow = ("a", "b") if i.clients == "marbles" else ()
        spec = InboundSpec(i.name, "127.0.0.1", 0, i.clients, allow, "t.test", tmp_path / "s")
        listeners.append(InboundListener(spec, ctx, ConnectionSet()))
    _set_allow(cfg, MeshView("t.test", {"web": ("b", "c")}), listeners)
    assert [li.spec.allow for li in listeners] == [("b", "c"), ("b",), ()]
