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


def test_under_gramine_the_proxy_installs_the_sealing_key_in_its_own_process(
    tmp_path: Path,
) -> None:
    """The app is the proxy's child, and the agent another process (another enclave under
    Gramine): the key the agent received must be installed by the proxy itself."""
    import yaml

    from meshproxy._redact import Secret
    from meshproxy.config import load_marble_config
    from meshproxy.errors import CoordinatorError
    from meshproxy.runtime._main import _install_sealing_key
    from meshproxy.runtime._renew import Lease
    from meshproxy.tls import TLSIdentity

    (tmp_path / "dev" / "attestation" / "keys").mkdir(parents=True)
    doc = {
        "coordinator": {"address": "127.0.0.1:2001"},
        "marble": {"type": "web"},
        "attestation": {"provider": "gramine", "device_dir": "dev"},
        "workdir": "run",
    }
    (tmp_path / "marble.yaml").write_text(yaml.safe_dump(doc))
    cfg = load_marble_config(tmp_path / "marble.yaml")
    key = bytes(range(16))
    activated = _agent.Activated(
        uuid="u", identity=TLSIdentity(b"", Secret(b""), b""), root_pem=b"", files={}, env={},
        argv=(), mesh=_agent.MeshView("t.test", {}), lease=Lease(0, 1, "x"), simulated=False,
        sealing_key=Secret(key),
    )  # fmt: skip
    _install_sealing_key(cfg, activated)
    assert (tmp_path / "dev" / "attestation" / "keys" / "meshproxy_sealing").read_bytes() == key
    import dataclasses

    with pytest.raises(CoordinatorError, match="no sealing key"):
        _install_sealing_key(cfg, dataclasses.replace(activated, sealing_key=None))


def _marble_config(tmp_path: Path) -> Path:
    """A simulated marble whose signed enclave file is missing: the agent stops there."""
    import yaml

    doc = {
        "coordinator": {"address": "127.0.0.1:1", "activation_timeout": "1s"},
        "marble": {"type": "web"},
        "attestation": {"provider": "simulation", "enclave": "absent.signed.json"},
        "workdir": "run",
    }
    path = tmp_path / "marble.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path


def test_an_agent_forked_before_the_config_gets_it_from_the_proxy(tmp_path: Path) -> None:
    """meshproxy run forks the agent first and parses the config meanwhile: the agent
    works from what the proxy parsed, not from the file (gone here by then)."""
    from meshproxy.config._marble import load_marble_document

    path = _marble_config(tmp_path)
    pending = _agent.begin_activation(path)
    cfg, document = load_marble_document(path)
    path.unlink()
    pending.configure(cfg, document)
    with pytest.raises(ConfigError, match=r"absent\.signed\.json"):
        _agent.activate(path, 10, pending=pending)


def test_a_config_that_is_not_json_makes_the_agent_read_the_file(tmp_path: Path) -> None:
    import datetime

    from meshproxy.config._marble import load_marble_document

    path = _marble_config(tmp_path)
    pending = _agent.begin_activation(path)
    cfg, document = load_marble_document(path)
    path.unlink()
    pending.configure(cfg, {**document, "value": {"when": datetime.date(2026, 1, 1)}})
    with pytest.raises(ConfigError, match=r"marble\.yaml: file not found"):
        _agent.activate(path, 10, pending=pending)
