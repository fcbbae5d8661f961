"""The attestation agent's plumbing: a failure in the agent comes back to the proxy as
the same MeshError, from a fork (activation) and from a new interpreter (renewal)."""

from __future__ import annotations

from pathlib import Path

import pytest

from meshproxy.errors import ConfigError
from meshproxy.runtime import _agent


def test_a_forked_activation_reports_the_agents_error(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere.yaml"
    pending = _agent.begin_activation(missing)
    with pytest.raises(ConfigError, match=r"nowhere\.yaml"):
        _agent.activate(missing, 10, pending=pending)
    pending.cancel()  # idempotent once read


def test_a_renewal_agent_reports_the_agents_error(tmp_path: Path) -> None:
    bad = tmp_path / "marble.yaml"
    bad.write_text("coordinator: {address: 'no port'}\n")
    with pytest.raises(ConfigError, match=r"marble\.yaml"):
        _agent.renew(bad, "00000000-0000-0000-0000-000000000000", b"", 20)


def test_cancel_kills_and_reaps_a_working_agent(tmp_path: Path) -> None:
    import os

    pending = _agent.begin_activation(tmp_path / "x.yaml")
    assert isinstance(pending, _agent.Forked)
    pid = pending._pid
    pending.cancel()
    pending.cancel()  # idempotent
    with pytest.raises(ChildProcessError):  # killed and reaped: no zombie left behind
        os.waitpid(pid, os.WNOHANG)
