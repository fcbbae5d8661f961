"""``TLS`` tags (MarbleRun Transparent TLS) and our ``Mesh`` section.

The ``Mesh`` section is where meshproxy goes beyond MarbleRun: the SPIFFE trust domain,
the marble certificate lifetime, and which marble types may call which. An absent
``Allow`` entry means nobody may call that marble type (fail closed).
"""

from __future__ import annotations

import re
from collections.abc import Mapping

from meshproxy.config import Node, parse_duration
from meshproxy.manifest._model import (
    CERT_TYPES,
    DEFAULT_CERTIFICATE_LIFETIME,
    DEFAULT_TRUST_DOMAIN,
    Marble,
    MeshSection,
    SecretSpec,
    TLSEntry,
    TLSTag,
)
from meshproxy.manifest._read import frozen, opt_bool, opt_str, present, suggest

_ENTRY_KEYS = ("Port", "Addr", "Cert", "DisableClientAuth")
_LABEL = re.compile(r"[a-z0-9_]([a-z0-9_-]{0,61}[a-z0-9_])?")
_MIN_LIFETIME = 60.0
_MAX_LIFETIME = 365 * 86400.0


def parse_tls(node: Node | None, secrets: Mapping[str, SecretSpec]) -> dict[str, TLSTag]:
    if node is None:
        return {}
    tags: dict[str, TLSTag] = {}
    for name, child in node.items().items():
        fields = child.mapping(("Outgoing", "Incoming"), case_insensitive=True)
        outgoing = present(fields, "Outgoing")
        incoming = present(fields, "Incoming")
        tags[name] = TLSTag(
            outgoing=tuple(_outgoing(n) for n in outgoing.list()) if outgoing else (),
            incoming=tuple(_incoming(n, secrets) for n in incoming.list()) if incoming else (),
        )
    return tags


def _entry(node: Node) -> tuple[dict[str, Node], TLSEntry]:
    fields = node.mapping(_ENTRY_KEYS, case_insensitive=True)
    entry = TLSEntry(
        port=opt_str(fields, "Port"),
        addr=opt_str(fields, "Addr"),
        cert=opt_str(fields, "Cert"),
        disable_client_auth=opt_bool(fields, "DisableClientAuth"),
    )
    if not entry.port:
        node.fail("missing required key 'Port'")
    return fields, entry


def _outgoing(node: Node) -> TLSEntry:
    fields, entry = _entry(node)
    if not entry.addr:
        node.fail("missing required key 'Addr' (the IP address or DNS name to connect to)")
    for key in ("Cert", "DisableClientAuth"):
        if present(fields, key) is not None:
            fields[key].fail("only Incoming entries take this key")
    return entry


def _incoming(node: Node, secrets: Mapping[str, SecretSpec]) -> TLSEntry:
    fields, entry = _entry(node)
    if entry.cert:
        secret = secrets.get(entry.cert)
        if secret is None:
            fields["Cert"].fail(f"no secret named {entry.cert!r}{suggest(entry.cert, secrets)}")
        if secret.type not in CERT_TYPES:
            fields["Cert"].fail(f"secret {entry.cert!r} is a {secret.type}, not a certificate")
        if not entry.disable_client_auth:
            node.fail(
                "an entry with its own Cert serves outside clients: set DisableClientAuth: true"
            )
    elif entry.disable_client_auth:
        fields["DisableClientAuth"].fail(
            "client authentication can only be disabled for an entry with its own Cert"
        )
    return entry


def parse_mesh(node: Node | None, marbles: Mapping[str, Marble]) -> MeshSection:
    if node is None:
        return MeshSection(DEFAULT_TRUST_DOMAIN, DEFAULT_CERTIFICATE_LIFETIME, frozen({}))
    fields = node.mapping(("TrustDomain", "CertificateLifetime", "Allow"), case_insensitive=True)
    domain_node = present(fields, "TrustDomain")
    trust_domain = DEFAULT_TRUST_DOMAIN if domain_node is None else _trust_domain(domain_node)
    lifetime = DEFAULT_CERTIFICATE_LIFETIME
    lifetime_node = present(fields, "CertificateLifetime")
    if lifetime_node is not None:
        lifetime = parse_duration(lifetime_node)
        if not _MIN_LIFETIME <= lifetime <= _MAX_LIFETIME:
            lifetime_node.fail("must be between 1m and 365d")
    allow: dict[str, tuple[str, ...]] = {}
    allow_node = present(fields, "Allow")
    for callee, callers_node in allow_node.items().items() if allow_node else []:
        if callee not in marbles:
            callers_node.fail(f"no marble named {callee!r}{suggest(callee, marbles)}")
        callers: list[str] = []
        for caller_node in callers_node.list():
            caller = caller_node.str()
            if caller not in marbles:
                caller_node.fail(f"no marble named {caller!r}{suggest(caller, marbles)}")
            callers.append(caller)
        allow[callee] = tuple(dict.fromkeys(callers))
    return MeshSection(trust_domain, lifetime, frozen(allow))


def _trust_domain(node: Node) -> str:
    text = node.str()
    if text != text.lower():
        node.fail(f"must be lower case (SPIFFE trust domain): {text!r}")
    labels = text.split(".")
    if len(text) > 253 or not all(_LABEL.fullmatch(label) for label in labels):
        node.fail(f"not a DNS-like name: {text!r} (labels of a-z, 0-9, '-', '_' separated by dots)")
    return text
