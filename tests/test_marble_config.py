"""The marble config: defaults, and every refusal naming the file and the key path."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import yaml

from meshproxy.config import Address, load_marble_config
from meshproxy.errors import ConfigError

ROOT = Path(__file__).resolve().parent.parent

BASE: dict[str, Any] = {
    "coordinator": {"address": "127.0.0.1:2001"},
    "marble": {"type": "backend"},
    "attestation": {"provider": "simulation", "enclave": "backend.signed.json"},
    "workdir": "run",
    "inbound": [{"name": "api", "listen": "127.0.0.1:8443", "clients": "marbles"}],
    "outbound": [{"name": "store", "upstream": "store.mesh.local:6443", "peer": "store"}],
}


def write(tmp_path: Path, doc: dict[str, Any]) -> Path:
    path = tmp_path / "marble.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path


def test_defaults_are_the_strict_and_documented_ones(tmp_path: Path) -> None:
    cfg = load_marble_config(write(tmp_path, BASE))
    base = tmp_path.resolve()
    assert cfg.coordinator.address == Address("127.0.0.1", 2001)
    assert cfg.coordinator.activation_timeout == 60.0
    assert cfg.coordinator.root_cert is None
    assert cfg.marble.uuid_file is None
    assert cfg.marble.dns_names == ()
    assert cfg.attestation.accept_simulation is False  # trusting simulation is explicit
    assert cfg.attestation.enclave == base / "backend.signed.json"  # relative to the file
    assert cfg.attestation.platform_dir is None
    assert cfg.workdir == base / "run"
    assert cfg.files_root == base / "run" / "files"
    assert cfg.admin_socket == base / "run" / "admin.sock"
    assert (cfg.log.level, cfg.log.format) == ("info", "json")
    (api,) = cfg.inbound
    assert (api.protocol, api.clients, api.allow) == ("tcp", "marbles", None)
    (store,) = cfg.outbound
    assert store.sni == "store.mesh.local"  # the upstream's DNS name
    assert cfg.inbound_socket("api") == base / "run" / "inbound-api.sock"
    assert cfg.outbound_socket("store") == base / "run" / "outbound-store.sock"
    assert cfg.ready_file == base / "run" / "ready.json"


def test_every_key_of_the_documented_shape_is_read(tmp_path: Path) -> None:
    doc = copy.deepcopy(BASE)
    doc["coordinator"] |= {
        "address": "[::1]:2001",
        "root_cert": "/etc/root.pem",
        "activation_timeout": "90s",
    }
    doc["marble"] |= {"uuid_file": "uuid", "dns_names": ["backend.mesh.local"]}
    doc["attestation"] |= {"accept_simulation": True, "platform_dir": "sim"}
    doc["files_root"] = "/srv/files"
    doc["inbound"] = [
        {
            "name": "api",
            "listen": "0.0.0.0:0",
            "protocol": "tcp",
            "clients": "marbles",
            "allow": ["frontend"],
        },
        {"name": "web", "listen": "127.0.0.1:0", "clients": "public"},
    ]
    doc["outbound"] = [
        {"name": "ip", "upstream": "10.0.0.1:443", "peer": "store"},
        {"name": "named", "upstream": "10.0.0.2:443", "peer": "store", "sni": "s.mesh.local"},
    ]
    doc["admin"] = {"socket": "adm.sock"}
    doc["log"] = {"level": "debug", "format": "text"}
    cfg = load_marble_config(write(tmp_path, doc))
    assert cfg.coordinator.address == Address("::1", 2001)
    assert str(cfg.coordinator.address) == "[::1]:2001"
    assert cfg.coordinator.root_cert == Path("/etc/root.pem")
    assert cfg.coordinator.activation_timeout == 90.0
    assert cfg.marble.uuid_file == tmp_path.resolve() / "uuid"
    assert cfg.marble.dns_names == ("backend.mesh.local",)
    assert cfg.attestation.accept_simulation is True
    assert cfg.files_root == Path("/srv/files")
    assert cfg.inbound[0].allow == ("frontend",)
    assert cfg.inbound[1].clients == "public"
    assert cfg.outbound[0].sni is None  # no SNI for an IP upstream
    assert cfg.outbound[1].sni == "s.mesh.local"
    assert cfg.admin_socket == cfg.workdir / "adm.sock"
    assert (cfg.log.level, cfg.log.format) == ("debug", "text")


def _set(doc: dict[str, Any], path: str, value: Any) -> None:
    *parents, last = path.split(".")
    node: Any = doc
    for part in parents:
        node = node[int(part)] if part.isdigit() else node[part]
    if value is _DELETE:
        del node[int(last) if last.isdigit() else last]
    elif last.isdigit():
        node[int(last)] = value
    else:
        node[last] = value


_DELETE = object()

REFUSALS = [
    ("inbound.0.alow", ["frontend"], "inbound[0]", "unknown key 'alow' (did you mean 'allow'?)"),
    ("workdri", "/x", "", "unknown key 'workdri' (did you mean 'workdir'?)"),
    ("coordinator.adress", "x:1", "coordinator", "unknown key 'adress' (did you mean 'address'?)"),
    ("coordinator.address", _DELETE, "coordinator", "missing required key 'address'"),
    ("marble.type", _DELETE, "marble", "missing required key 'type'"),
    ("workdir", _DELETE, "", "missing required key 'workdir'"),
    (
        "coordinator.address",
        "127.0.0.1",
        "coordinator.address",
        "invalid address '127.0.0.1': expected HOST:PORT",
    ),
    (
        "coordinator.address",
        "::1:2001",
        "coordinator.address",
        "invalid address '::1:2001': write IPv6 addresses as [::1]:2001",
    ),
    (
        "coordinator.address",
        "127.0.0.1:0",
        "coordinator.address",
        "invalid address '127.0.0.1:0': port must be a number from 1 to 65535",
    ),
    (
        "outbound.0.upstream",
        "store:99999",
        "outbound[0].upstream",
        "invalid address 'store:99999': port must be",
    ),
    (
        "inbound.0.listen",
        "bad_host!:80",
        "inbound[0].listen",
        "invalid address 'bad_host!:80': 'bad_host!' is not an IP address or DNS name",
    ),
    (
        "inbound.0.listen",
        "[not-v6]:80",
        "inbound[0].listen",
        "invalid address '[not-v6]:80': 'not-v6' is not an IPv6 address",
    ),
    (
        "coordinator.activation_timeout",
        "soon",
        "coordinator.activation_timeout",
        "invalid duration 'soon'",
    ),
    (
        "inbound.0.app_protocol",
        "h2c",
        "inbound[0].app_protocol",
        "app_protocol is only for protocol: http (this listener is tcp)",
    ),
    (
        "inbound.0.protocol",
        "udp",
        "inbound[0].protocol",
        "must be one of tcp, http, hbone; got 'udp'",
    ),
    ("inbound.0.clients", "users", "inbound[0].clients", "clients: users is not available yet"),
    (
        "inbound.0.clients",
        "marble",
        "inbound[0].clients",
        "must be one of marbles, public, users; got 'marble' (did you mean 'marbles'?)",
    ),
    (
        "attestation.provider",
        "gramine",
        "attestation.enclave",
        "the signed enclave description is for provider simulation; under gramine",
    ),
    (
        "attestation.provider",
        "sgx",
        "attestation.provider",
        "must be one of simulation, gramine, occlum; got 'sgx'",
    ),
    (
        "attestation.device_dir",
        "fake-dev",
        "attestation.device_dir",
        "device_dir is only for the gramine and occlum providers",
    ),
    ("attestation.enclave", _DELETE, "attestation", "missing required key 'enclave'"),
    (
        "attestation.accept_simulation",
        "yes please",
        "attestation.accept_simulation",
        "expected true or false",
    ),
    ("inbound.0.name", "API", "inbound[0].name", "invalid name 'API'"),
    ("outbound.0.peer", "no/slash", "outbound[0].peer", "marble type 'no/slash' is not valid"),
    ("outbound.0.sni", "10.0.0.1", "outbound[0].sni", "'10.0.0.1' is not a valid DNS name"),
    (
        "marble.dns_names",
        ["ok.local", "not ok"],
        "marble.dns_names[1]",
        "'not ok' is not a valid DNS name",
    ),
    (
        "log.level",
        "verbose",
        "log.level",
        "must be one of debug, info, warning, error; got 'verbose'",
    ),
    ("inbound", {"name": "api"}, "inbound", "expected a list, got a mapping"),
]


@pytest.mark.parametrize(
    ("path", "value", "where", "problem"), REFUSALS, ids=[r[0] for r in REFUSALS]
)
def test_refusals_name_the_file_and_the_key_path(
    tmp_path: Path, path: str, value: Any, where: str, problem: str
) -> None:
    message = f"marble.yaml: {where}: {problem}" if where else f"marble.yaml: {problem}"
    doc = copy.deepcopy(BASE)
    doc["log"] = {"level": "info"}
    _set(doc, path, value)
    with pytest.raises(ConfigError) as err:
        load_marble_config(write(tmp_path, doc))
    assert str(err.value).startswith(message)


def test_allow_is_only_for_marbles_listeners(tmp_path: Path) -> None:
    doc = copy.deepcopy(BASE)
    doc["inbound"][0] |= {"clients": "public", "allow": ["frontend"]}
    with pytest.raises(ConfigError, match=r"^marble.yaml: inbound\[0\].allow: allow applies only"):
        load_marble_config(write(tmp_path, doc))


def test_names_are_unique_across_inbound_and_outbound(tmp_path: Path) -> None:
    doc = copy.deepcopy(BASE)
    doc["outbound"][0]["name"] = "api"
    with pytest.raises(ConfigError) as err:
        load_marble_config(write(tmp_path, doc))
    assert str(err.value) == (
        "marble.yaml: outbound[0]: name 'api' is already used by inbound[0]; names must be unique"
    )


@pytest.mark.parametrize(
    ("first", "second"),
    [
        ("127.0.0.1:8443", "127.0.0.1:8443"),
        ("0.0.0.0:8443", "127.0.0.1:8443"),
        ("[::]:8443", "127.0.0.1:8443"),
    ],
)
def test_two_listeners_cannot_share_an_address(tmp_path: Path, first: str, second: str) -> None:
    doc = copy.deepcopy(BASE)
    doc["inbound"] = [
        {"name": "a", "listen": first},
        {"name": "b", "listen": second},
    ]
    with pytest.raises(
        ConfigError, match=r"^marble.yaml: inbound\[1\]: listen address .* collides"
    ):
        load_marble_config(write(tmp_path, doc))


def test_port_zero_listeners_never_collide(tmp_path: Path) -> None:
    doc = copy.deepcopy(BASE)
    doc["inbound"] = [
        {"name": "a", "listen": "127.0.0.1:0"},
        {"name": "b", "listen": "127.0.0.1:0"},
    ]
    assert len(load_marble_config(write(tmp_path, doc)).inbound) == 2


def test_yaml_syntax_errors_name_file_and_line(tmp_path: Path) -> None:
    path = tmp_path / "marble.yaml"
    path.write_text("coordinator:\n  address: [unclosed\n")
    with pytest.raises(ConfigError, match=r"^marble.yaml: line \d+"):
        load_marble_config(path)


def test_a_missing_file_is_named(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"nope\.yaml: file not found"):
        load_marble_config(tmp_path / "nope.yaml")


@pytest.mark.parametrize("name", ["backend.yaml", "frontend.yaml"])
def test_the_demo_marble_configs_load(name: str) -> None:
    path = ROOT / "configs" / "demo" / name
    cfg = load_marble_config(path)
    assert cfg.marble.type == name.removesuffix(".yaml")
    assert cfg.attestation.accept_simulation is True
    assert cfg.workdir.is_relative_to(path.parent.resolve())
