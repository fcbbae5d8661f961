"""The marble config (``meshproxy run --config marble.yaml``) as frozen dataclasses.

Parsed once, strictly: unknown keys, malformed addresses, duplicate names and colliding
listeners are ``ConfigError``s naming the file and key path. Relative paths are taken
from the config file's directory, except ``admin.socket``, which is relative to
``workdir``. Features that are designed but not built yet (``users`` clients) are refused
with a message saying so, never silently downgraded. ``attestation.provider`` is
``simulation`` (needs the signed ``enclave`` description, re-measured at start) or a
hardware provider, ``gramine`` or ``occlum``, whose devices are under ``device_dir``
(default ``/dev``: ``/dev/attestation``, ``/dev/sgx``); there the hardware measures the
enclave, so ``enclave`` is refused.
Options that only make sense for some protocols (``app_protocol`` and ``routes`` for
``http``, ``proxy_protocol`` for ``tcp`` and ``hbone``) are errors on the others.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from meshproxy.config._strict import Node, load_file, parse_duration
from meshproxy.errors import ConfigError, PolicyError
from meshproxy.pki import check_marble_type

if TYPE_CHECKING:
    from meshproxy.manifest import RouteRule

DEFAULT_ACTIVATION_TIMEOUT = 60.0
_NAME_RE = re.compile(r"^[a-z0-9_]+$")
_LABEL_RE = re.compile(r"^(?!-)[A-Za-z0-9-]{1,63}(?<!-)$")
_METHOD_RE = re.compile(r"^[A-Z][A-Z0-9_-]{0,31}$")


@dataclass(frozen=True)
class Address:
    """A ``HOST:PORT``; IPv6 hosts are kept without brackets."""

    host: str
    port: int

    @property
    def is_ip(self) -> bool:
        try:
            ipaddress.ip_address(self.host)
        except ValueError:
            return False
        return True

    def __str__(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"


@dataclass(frozen=True)
class CoordinatorConfig:
    address: Address
    root_cert: Path | None
    activation_timeout: float
    policy: Path | None = None  # the coordinator identity to require (manifest verify's format)
    update_poll: float = 10.0  # seconds between polls for a new intermediate (renewal)


@dataclass(frozen=True)
class MarbleSection:
    type: str
    uuid_file: Path | None
    dns_names: tuple[str, ...]


@dataclass(frozen=True)
class AttestationConfig:
    provider: str  # simulation | gramine | occlum
    accept_simulation: bool
    enclave: Path | None  # the signed description; simulation only
    platform_dir: Path | None  # None: the attestation package's default
    device_dir: Path = Path("/dev")  # gramine, occlum: where attestation/ and sgx are


@dataclass(frozen=True)
class TLSConfig:
    """A listener's TLS: 1.3 only and no session tickets unless configured (``tls:``).

    Tickets are off by default for forward secrecy inside the enclave: a ticket key that
    leaks decrypts every session resumed with it.
    """

    min_version: str = "1.3"  # "1.2" | "1.3"
    session_tickets: bool = False


@dataclass(frozen=True)
class HttpTimeouts:
    """``timeouts:`` of a ``protocol: http`` or ``hbone`` listener (both directions).

    ``idle``: a connection with no request in progress is closed (Envoy's default, 1 h);
    ``header``: a request head that started arriving must be complete (10 s, the time
    Linkerd gives a client to show its protocol): slowloris clients are cut off.
    """

    idle: float = 3600.0
    header: float = 10.0


@dataclass(frozen=True)
class InboundConfig:
    name: str
    listen: Address
    protocol: str
    clients: str  # "marbles" | "public"
    allow: tuple[str, ...] | None  # None: the manifest's Mesh.Allow callers
    app_protocol: str = "http1"  # protocol http: how the app's socket speaks (http1 | h2c)
    proxy_protocol: str | None = None  # tcp, hbone: "v2" sends a PROXY v2 header first
    routes: tuple[RouteRule, ...] = ()  # protocol http: narrows the manifest's Mesh.Routes
    tls: TLSConfig = TLSConfig()
    timeouts: HttpTimeouts = HttpTimeouts()  # protocol http, hbone


@dataclass(frozen=True)
class OutboundConfig:
    name: str
    upstream: Address
    peer: str
    sni: str | None
    protocol: str = "tcp"  # tcp | http | hbone
    tls: TLSConfig = TLSConfig()
    timeouts: HttpTimeouts = HttpTimeouts()  # protocol http, hbone


@dataclass(frozen=True)
class LogConfig:
    level: str
    format: str


@dataclass(frozen=True)
class MarbleConfig:
    source: Path
    coordinator: CoordinatorConfig
    marble: MarbleSection
    attestation: AttestationConfig
    workdir: Path
    files_root: Path
    inbound: tuple[InboundConfig, ...]
    outbound: tuple[OutboundConfig, ...]
    admin_socket: Path
    log: LogConfig

    def inbound_socket(self, name: str) -> Path:
        """Where the app must listen for listener ``name``."""
        return self.workdir / f"inbound-{name}.sock"

    def outbound_socket(self, name: str) -> Path:
        """Where the app connects to reach outbound ``name``."""
        return self.workdir / f"outbound-{name}.sock"

    @property
    def ready_file(self) -> Path:
        return self.workdir / "ready.json"


def load_marble_config(path: str | Path) -> MarbleConfig:
    return load_marble_document(path)[0]


def load_marble_document(path: str | Path) -> tuple[MarbleConfig, dict[str, Any]]:
    """The config, and the document it was made from (``value``: as parsed from the
    file, ``base_dir``, ``source``), of which ``from_marble_document`` makes the same
    config: how ``meshproxy run`` hands its config to its attestation agent as JSON."""
    p = Path(path)
    root = load_file(p)
    base_dir = p.resolve().parent
    cfg = parse_marble_config(root, base_dir=base_dir, source=p)
    return cfg, {"value": root.value, "base_dir": str(base_dir), "source": str(p)}


def from_marble_document(doc: Mapping[str, Any]) -> MarbleConfig:
    source = Path(doc["source"])
    root = Node(doc["value"], source.name, "", ConfigError)
    return parse_marble_config(root, base_dir=Path(doc["base_dir"]), source=source)


def parse_marble_config(root: Node, *, base_dir: Path, source: Path) -> MarbleConfig:
    top = root.mapping(
        ["coordinator", "marble", "attestation", "workdir", "files_root", "inbound",
         "outbound", "admin", "log"],
        required=["coordinator", "marble", "attestation", "workdir"],
    )  # fmt: skip
    workdir = _path(top["workdir"], base_dir)
    files_root = _path(top["files_root"], base_dir) if _given(top, "files_root") else None
    inbound = tuple(_inbound(n) for n in top["inbound"].list()) if "inbound" in top else ()
    outbound = tuple(_outbound(n) for n in top["outbound"].list()) if "outbound" in top else ()
    _check_unique(top, inbound, outbound)
    return MarbleConfig(
        source=source,
        coordinator=_coordinator(top["coordinator"], base_dir),
        marble=_marble(top["marble"], base_dir),
        attestation=_attestation(top["attestation"], base_dir),
        workdir=workdir,
        files_root=files_root or workdir / "files",
        inbound=inbound,
        outbound=outbound,
        admin_socket=_admin(top.get("admin"), workdir),
        log=_log(top.get("log")),
    )


# -- sections -----------------------------------------------------------------------------
def _coordinator(node: Node, base: Path) -> CoordinatorConfig:
    m = node.mapping(
        ["address", "root_cert", "activation_timeout", "policy", "update_poll"],
        required=["address"],
    )
    timeout = DEFAULT_ACTIVATION_TIMEOUT
    if _given(m, "activation_timeout"):
        timeout = parse_duration(m["activation_timeout"])
    poll = 10.0
    if _given(m, "update_poll"):
        poll = parse_duration(m["update_poll"])
        if not 1.0 <= poll <= 3600.0:
            m["update_poll"].fail("must be between 1s and 1h")
    if _given(m, "root_cert") and _given(m, "policy"):
        m["policy"].fail(
            "give root_cert or policy, not both: a pinned root is trusted as is, a policy "
            "checks the coordinator's quote"
        )
    return CoordinatorConfig(
        address=parse_address(m["address"], allow_port_zero=False),
        root_cert=_path(m["root_cert"], base) if _given(m, "root_cert") else None,
        activation_timeout=timeout,
        policy=_path(m["policy"], base) if _given(m, "policy") else None,
        update_poll=poll,
    )


def _marble(node: Node, base: Path) -> MarbleSection:
    m = node.mapping(["type", "uuid_file", "dns_names"], required=["type"])
    dns = m["dns_names"].list() if "dns_names" in m else []
    for n in dns:
        _dns_name(n)
    return MarbleSection(
        type=_marble_type(m["type"]),
        uuid_file=_path(m["uuid_file"], base) if _given(m, "uuid_file") else None,
        dns_names=tuple(n.str() for n in dns),
    )


def _attestation(node: Node, base: Path) -> AttestationConfig:
    m = node.mapping(
        ["provider", "accept_simulation", "enclave", "platform_dir", "device_dir"],
        required=["provider"],
    )
    provider = m["provider"].choice(["simulation", "gramine", "occlum"])
    if provider == "simulation":
        if not _given(m, "enclave"):
            node.fail("missing required key 'enclave' (the signed enclave description)")
        if "device_dir" in m:
            m["device_dir"].fail("device_dir is only for the gramine and occlum providers")
    elif "enclave" in m:
        m["enclave"].fail(
            f"the signed enclave description is for provider simulation; under {provider} "
            "the hardware measures the enclave (MRENCLAVE): remove 'enclave'"
        )
    device_dir = _path(m["device_dir"], base) if _given(m, "device_dir") else Path("/dev")
    return AttestationConfig(
        provider=provider,
        accept_simulation=_given(m, "accept_simulation") and m["accept_simulation"].bool(),
        enclave=_path(m["enclave"], base) if provider == "simulation" else None,
        platform_dir=_path(m["platform_dir"], base) if _given(m, "platform_dir") else None,
        device_dir=device_dir,
    )


def _inbound(node: Node) -> InboundConfig:
    m = node.mapping(
        ["name", "listen", "protocol", "clients", "allow", "app_protocol", "proxy_protocol",
         "routes", "tls", "timeouts"],
        required=["name", "listen"],
    )  # fmt: skip
    protocol = m["protocol"].choice(["tcp", "http", "hbone"]) if _given(m, "protocol") else "tcp"
    for key, needs in (("app_protocol", "http"), ("routes", "http"), ("proxy_protocol", "tcp")):
        if key in m and protocol not in (needs, "hbone" if needs == "tcp" else needs):
            m[key].fail(f"{key} is only for protocol: {needs} (this listener is {protocol})")
    app_protocol = (
        m["app_protocol"].choice(["http1", "h2c"]) if _given(m, "app_protocol") else "http1"
    )
    proxy_protocol = m["proxy_protocol"].choice(["v2"]) if _given(m, "proxy_protocol") else None
    # The default is the strict one: only attested marbles of allowed types get in.
    clients = (
        m["clients"].choice(["marbles", "public", "users"]) if _given(m, "clients") else "marbles"
    )
    if clients == "users":
        m["clients"].fail("clients: users is not available yet (use marbles or public)")
    if protocol == "hbone" and clients != "marbles":
        m["clients"].fail("protocol: hbone is mutual TLS between marbles: use clients: marbles")
    allow: tuple[str, ...] | None = None
    if "allow" in m:
        if clients != "marbles":
            m["allow"].fail("allow applies only to clients: marbles")
        allow = tuple(_marble_type(n) for n in m["allow"].list())
    routes: tuple[RouteRule, ...] = ()
    if "routes" in m:
        if clients != "marbles":
            m["routes"].fail("routes apply only to clients: marbles (callers with an identity)")
        routes = tuple(_route(n, allow) for n in m["routes"].list())
    return InboundConfig(
        name=_name(m["name"]),
        listen=parse_address(m["listen"], allow_port_zero=True),
        protocol=protocol,
        clients=clients,
        allow=allow,
        app_protocol=app_protocol,
        proxy_protocol=proxy_protocol,
        routes=routes,
        tls=_tls(m["tls"]) if _given(m, "tls") else TLSConfig(),
        timeouts=_timeouts(m, protocol),
    )


def _route(node: Node, allow: tuple[str, ...] | None) -> RouteRule:
    from meshproxy.manifest import RouteRule, path_problem  # the manifest imports config

    m = node.mapping(["path", "path_prefix", "methods", "allow"], required=["allow"])
    if _given(m, "path") == _given(m, "path_prefix"):
        node.fail("give exactly one of 'path' (exact) and 'path_prefix'")
    where = m["path"] if _given(m, "path") else m["path_prefix"]
    problem = path_problem(where.str())
    if problem:
        where.fail(f"{where.str()!r} {problem}")
    methods = []
    for n in m["methods"].list() if "methods" in m else []:
        if not _METHOD_RE.match(n.str()):
            n.fail(f"{n.str()!r} is not an HTTP method (upper case, e.g. GET or POST)")
        methods.append(n.str())
    callers = []
    for n in m["allow"].list():
        caller = _marble_type(n)
        if allow is not None and caller not in allow:
            n.fail(f"{caller!r} is not in this listener's allow list; a route can only narrow it")
        callers.append(caller)
    return RouteRule(
        path=where.str() if _given(m, "path") else None,
        path_prefix=where.str() if _given(m, "path_prefix") else None,
        methods=tuple(dict.fromkeys(methods)),
        allow=tuple(dict.fromkeys(callers)),
    )


def _outbound(node: Node) -> OutboundConfig:
    m = node.mapping(
        ["name", "upstream", "peer", "sni", "protocol", "tls", "timeouts"],
        required=["name", "upstream", "peer"],
    )
    upstream = parse_address(m["upstream"], allow_port_zero=False)
    sni = _dns_name(m["sni"]) if _given(m, "sni") else None
    if sni is None and not upstream.is_ip:
        sni = upstream.host
    protocol = m["protocol"].choice(["tcp", "http", "hbone"]) if _given(m, "protocol") else "tcp"
    tls = _tls(m["tls"]) if _given(m, "tls") else TLSConfig()
    return OutboundConfig(
        _name(m["name"]), upstream, _marble_type(m["peer"]), sni, protocol, tls=tls,
        timeouts=_timeouts(m, protocol),
    )  # fmt: skip


def _timeouts(m: dict[str, Node], protocol: str) -> HttpTimeouts:
    if not _given(m, "timeouts"):
        return HttpTimeouts()
    if protocol == "tcp":
        m["timeouts"].fail("timeouts are for protocol: http and hbone (this listener is tcp)")
    t = m["timeouts"].mapping(["idle", "header"])
    return HttpTimeouts(
        idle=parse_duration(t["idle"]) if _given(t, "idle") else HttpTimeouts.idle,
        header=parse_duration(t["header"]) if _given(t, "header") else HttpTimeouts.header,
    )


def _tls(node: Node) -> TLSConfig:
    m = node.mapping(["min_version", "session_tickets"])
    version = "1.3"
    if _given(m, "min_version"):
        v = m["min_version"]
        # unquoted in YAML, 1.2 is a number: take it as the version it spells
        if isinstance(v.value, float) and v.value in (1.2, 1.3):
            version = str(v.value)
        else:
            version = v.choice(["1.2", "1.3"])
    tickets = _given(m, "session_tickets") and m["session_tickets"].bool()
    return TLSConfig(min_version=version, session_tickets=tickets)


def _admin(node: Node | None, workdir: Path) -> Path:
    if node is None:
        return workdir / "admin.sock"
    m = node.mapping(["socket"])
    return workdir / m["socket"].str() if _given(m, "socket") else workdir / "admin.sock"


def _log(node: Node | None) -> LogConfig:
    if node is None:
        return LogConfig("info", "json")
    m = node.mapping(["level", "format"])
    level = m["level"].choice(["debug", "info", "warning", "error"]) if "level" in m else "info"
    fmt = m["format"].choice(["json", "text"]) if "format" in m else "json"
    return LogConfig(level, fmt)


# -- values -------------------------------------------------------------------------------
def parse_address(node: Node, *, allow_port_zero: bool) -> Address:
    """``HOST:PORT`` with an IPv4 address, a DNS name, or a bracketed IPv6 address."""
    text = node.str()
    if text.startswith("["):
        host, sep, port = text[1:].partition("]:")
        if not sep:
            node.fail(f"invalid address {text!r}: expected [IPV6]:PORT")
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            node.fail(f"invalid address {text!r}: {host!r} is not an IPv6 address")
    else:
        host, sep, port = text.rpartition(":")
        if not sep or not host:
            node.fail(f"invalid address {text!r}: expected HOST:PORT")
        if ":" in host:
            node.fail(f"invalid address {text!r}: write IPv6 addresses as [{host}]:{port}")
        if not _is_ipv4(host) and not _valid_dns(host):
            node.fail(f"invalid address {text!r}: {host!r} is not an IP address or DNS name")
    if not port.isdigit() or not (0 if allow_port_zero else 1) <= int(port) <= 65535:
        low = 0 if allow_port_zero else 1
        node.fail(f"invalid address {text!r}: port must be a number from {low} to 65535")
    return Address(host, int(port))


def _is_ipv4(host: str) -> bool:
    try:
        ipaddress.IPv4Address(host)
    except ValueError:
        return False
    return True


def _valid_dns(name: str) -> bool:
    labels = name.rstrip(".").split(".")
    return len(name) <= 253 and all(_LABEL_RE.match(label) for label in labels)


def _dns_name(node: Node) -> str:
    name = node.str()
    if not _valid_dns(name) or name.replace(".", "").isdigit():
        node.fail(f"{name!r} is not a valid DNS name")
    return name


def _name(node: Node) -> str:
    name = node.str()
    if not _NAME_RE.match(name):
        node.fail(f"invalid name {name!r}: use lower-case letters, digits and '_'")
    return name


def _marble_type(node: Node) -> str:
    try:
        return check_marble_type(node.str())
    except PolicyError as exc:
        node.fail(str(exc))


def _path(node: Node, base: Path) -> Path:
    text = node.str()
    if "\0" in text:
        node.fail("path contains a NUL byte")
    return base / Path(text).expanduser()


def _given(m: dict[str, Node], key: str) -> bool:
    return key in m and m[key].value is not None


def _check_unique(
    top: dict[str, Node], inbound: tuple[InboundConfig, ...], outbound: tuple[OutboundConfig, ...]
) -> None:
    names = [("inbound", i, x.name) for i, x in enumerate(inbound)]
    names += [("outbound", i, x.name) for i, x in enumerate(outbound)]
    seen: dict[str, str] = {}
    for section, i, name in names:
        if name in seen:
            top[section].list()[i].fail(
                f"name {name!r} is already used by {seen[name]}; names must be unique"
            )
        seen[name] = f"{section}[{i}]"
    bound: list[tuple[int, Address]] = []
    for i, listener in enumerate(inbound):
        addr = listener.listen
        for j, other in bound:
            if addr.port and addr.port == other.port and _overlap(addr.host, other.host):
                top["inbound"].list()[i].fail(
                    f"listen address {addr} collides with inbound[{j}] ({other})"
                )
        bound.append((i, addr))


def _overlap(a: str, b: str) -> bool:
    """Whether binding both hosts on one port would collide ('::' is dual-stack)."""
    if a == b or "::" in (a, b):
        return True
    return "0.0.0.0" in (a, b) and ":" not in a + b
