"""Hardware providers in the marble config, and the marble's virtual sealing key: derived
by the coordinator, handed out at activation, written to Gramine's key file."""

from __future__ import annotations

import copy
import logging
import uuid
from pathlib import Path
from typing import Any

import pytest
import yaml
from test_coordinator_env import NOW, World, package

from meshproxy._redact import Secret
from meshproxy.attestation import SEAL_KEY_NAME, GramineProvider, OcclumProvider
from meshproxy.config import load_marble_config
from meshproxy.coordinator.client import Activation, MeshPolicy
from meshproxy.errors import AttestationError, ConfigError, CoordinatorError
from meshproxy.runtime._activate import install_sealing_key, quote_provider

BASE: dict[str, Any] = {
    "coordinator": {"address": "127.0.0.1:2001"},
    "marble": {"type": "web"},
    "attestation": {"provider": "gramine"},
    "workdir": "run",
}


def _config(tmp_path: Path, **attestation: Any) -> Path:
    doc = copy.deepcopy(BASE)
    doc["attestation"].update(attestation)
    path = tmp_path / "marble.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path


# -- the config and the provider it builds -------------------------------------------------
def test_hardware_providers_default_to_dev(tmp_path: Path) -> None:
    cfg = load_marble_config(_config(tmp_path))
    assert cfg.attestation.provider == "gramine"
    assert cfg.attestation.device_dir == Path("/dev")
    assert cfg.attestation.enclave is None
    provider = quote_provider(cfg)
    assert isinstance(provider, GramineProvider)
    assert provider.attestation_dir == Path("/dev/attestation")


def test_device_dir_is_relative_to_the_config(tmp_path: Path) -> None:
    cfg = load_marble_config(_config(tmp_path, provider="occlum", device_dir="fake-dev"))
    provider = quote_provider(cfg)
    assert isinstance(provider, OcclumProvider)
    assert provider.device == tmp_path / "fake-dev" / "sgx"


def test_a_hardware_provider_outside_its_library_os_fails_closed(tmp_path: Path) -> None:
    cfg = load_marble_config(_config(tmp_path, device_dir="nothing-here"))
    with pytest.raises(AttestationError) as exc:
        quote_provider(cfg).get_quote(bytes(64))
    assert exc.value.check == "provider"
    assert "not running under Gramine" in str(exc.value)


def test_hardware_providers_refuse_a_simulation_enclave(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"attestation.enclave: the signed enclave description"):
        load_marble_config(_config(tmp_path, enclave="x.signed.json"))


# -- Gramine's key file ---------------------------------------------------------------------
@pytest.fixture
def gramine(tmp_path: Path) -> GramineProvider:
    (tmp_path / "attestation" / "keys").mkdir(parents=True)
    return GramineProvider(tmp_path / "attestation")


KEY = Secret(bytes(range(0xA0, 0xB0)))


def test_install_key_writes_16_raw_bytes_privately(gramine: GramineProvider) -> None:
    path = gramine.install_key(SEAL_KEY_NAME, KEY)
    assert path == gramine.attestation_dir / "keys" / "meshproxy_sealing"
    assert path.read_bytes() == KEY.reveal()
    assert path.stat().st_mode & 0o777 == 0o600
    gramine.install_key(SEAL_KEY_NAME, Secret(bytes(16)))  # replaced, not appended
    assert path.read_bytes() == bytes(16)


@pytest.mark.parametrize(
    ("name", "key", "problem"),
    [
        ("meshproxy_sealing", Secret(bytes(32)), "is 16 bytes, not 32"),
        ("_sgx_mrenclave", KEY, "is not a Gramine key name"),
        ("../escape", KEY, "is not a Gramine key name"),
        ("", KEY, "is not a Gramine key name"),
    ],
)
def test_install_key_refusals(
    gramine: GramineProvider, name: str, key: Secret, problem: str
) -> None:
    with pytest.raises(AttestationError) as exc:
        gramine.install_key(name, key)
    assert problem in str(exc.value)
    assert key.reveal().hex() not in str(exc.value)
    assert not (gramine.attestation_dir / "escape").exists()


def test_install_key_outside_gramine(tmp_path: Path) -> None:
    with pytest.raises(AttestationError, match="not running under Gramine"):
        GramineProvider(tmp_path / "attestation").install_key(SEAL_KEY_NAME, KEY)


def _activation(sealing_key: Secret | None) -> Activation:
    return Activation(
        marble_type="web", uuid=str(uuid.uuid4()), leaf=None, intermediate=None,  # type: ignore[arg-type]
        root=None, files={}, env={}, argv=(), mesh=MeshPolicy("t", {}),  # type: ignore[arg-type]
        simulated=False, sealing_key=sealing_key,
    )  # fmt: skip


def test_the_runtime_installs_the_key_under_gramine_without_logging_it(
    gramine: GramineProvider, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    activation = _activation(KEY)
    install_sealing_key(gramine, activation)
    assert (gramine.attestation_dir / "keys" / SEAL_KEY_NAME).read_bytes() == KEY.reveal()
    assert "sealing key installed" in caplog.text
    assert KEY.reveal().hex() not in caplog.text
    assert KEY.reveal().hex() not in repr(activation)


def test_the_runtime_fails_closed_without_a_key_under_gramine(gramine: GramineProvider) -> None:
    with pytest.raises(CoordinatorError, match="sent no sealing key"):
        install_sealing_key(gramine, _activation(None))


def test_other_providers_get_no_key_file(tmp_path: Path) -> None:
    occlum = OcclumProvider(tmp_path / "sgx")
    install_sealing_key(occlum, _activation(KEY))
    assert list(tmp_path.iterdir()) == []


# -- what the coordinator hands out ---------------------------------------------------------
@pytest.fixture
def world(tmp_path: Path) -> World:
    w = World(tmp_path)
    w.set_manifest(
        {
            "Packages": {"p": package()},
            "Marbles": {"web": {"Package": "p"}, "db": {"Package": "p"}},
        }
    )
    return w


def test_sealing_key_is_per_instance_and_stable(world: World) -> None:
    instance = str(uuid.uuid4())
    first = world.core.activate(world.request("web", instance=instance), now=NOW).sealing_key
    assert len(first) == 16
    again = world.core.activate(world.request("web", instance=instance), now=NOW).sealing_key
    assert again == first
    other = world.core.activate(world.request("web"), now=NOW).sealing_key
    assert other != first
    other_type = world.core.activate(world.request("db", instance=instance), now=NOW)
    assert other_type.sealing_key != first
    # A restarted coordinator (state unsealed from the store) derives the same key.
    world.boot()
    restarted = world.core.activate(world.request("web", instance=instance), now=NOW)
    assert restarted.sealing_key == first
    assert first.reveal().hex() not in repr(restarted)


# -- the marble's coordinator policy ----------------------------------------------------------
def test_coordinator_policy_is_a_path_beside_the_config(tmp_path: Path) -> None:
    doc = copy.deepcopy(BASE)
    doc["coordinator"]["policy"] = "coordinator-policy.yaml"
    path = tmp_path / "marble.yaml"
    path.write_text(yaml.safe_dump(doc))
    assert load_marble_config(path).coordinator.policy == tmp_path / "coordinator-policy.yaml"
    doc["coordinator"]["root_cert"] = "root.pem"
    path.write_text(yaml.safe_dump(doc))
    with pytest.raises(ConfigError, match=r"coordinator.policy: give root_cert or policy"):
        load_marble_config(path)
