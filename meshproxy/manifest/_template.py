"""The Go ``text/template`` subset MarbleRun manifests use in ``Files`` and ``Env``.

Theory of operation: a template is literal bytes with actions ``{{ FUNC REF }}`` (or
``{{ REF | FUNC }}``), where FUNC is one of pem, raw, hex, base64, string and REF is
``.Secrets.NAME[.PART]``, ``.Previous.Secrets.NAME[.PART]`` or
``.MarbleRun.RESERVED[.PART]`` with PART one of Cert, Public, Private. ``{{-`` and
``-}}`` trim the white space beside them, as in Go. Anything else inside ``{{ }}`` is an
error naming where it is and the column; so is a reference without a function (Go would
print a byte slice as ``[65 66 ...]``). The function rules are MarbleRun's
(marblerun.md 2.5): ``raw`` only in Files, ``string`` only in Env and only for plain
secrets, ``pem`` only with a part, and a reference without a part means the secret's
public bytes (the key itself for symmetric-key and plain secrets).
"""

from __future__ import annotations

import base64
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Literal, NoReturn

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from meshproxy._redact import Secret
from meshproxy.errors import ManifestError
from meshproxy.manifest._model import RESERVED_SECRETS, Marble
from meshproxy.manifest._read import suggest

Kind = Literal["file", "env"]
_Fail = Callable[[str], ManifestError]
_FUNCTIONS: dict[str, tuple[str, ...]] = {
    "file": ("pem", "raw", "hex", "base64"),
    "env": ("pem", "hex", "base64", "string"),
}
_PARTS = ("Cert", "Public", "Private")
_PEM_LABELS = {"Cert": "CERTIFICATE", "Public": "PUBLIC KEY", "Private": "PRIVATE KEY"}
_SPACE = b" \t\r\n"
_CONTROL = (
    "if",
    "else",
    "end",
    "range",
    "with",
    "define",
    "template",
    "block",
    "break",
    "continue",
)
_TOKEN = re.compile(r"\||[^\s|]+")
_REF = re.compile(r"(?:\.[^\W\d]\w*)+")


@dataclass(frozen=True)
class SecretValue:
    """A secret's value as templates see it (MarbleRun's ``manifest.Secret``)."""

    type: str  # a secret type, or "cert" for the MarbleRun.* certificates
    cert: x509.Certificate | None
    public: bytes  # PKIX DER for key pairs; the key bytes for symmetric-key and plain
    private: Secret | None  # PKCS#8 DER for key pairs; the key bytes otherwise


@dataclass(frozen=True)
class TemplateData:
    secrets: Mapping[str, SecretValue]
    previous_secrets: Mapping[str, SecretValue]
    marblerun: Mapping[str, SecretValue]  # RootCA, MarbleCert, CoordinatorRoot, ...


@dataclass(frozen=True)
class RenderedParameters:
    files: Mapping[str, bytes]
    env: Mapping[str, bytes]
    argv: tuple[str, ...]


@dataclass(frozen=True)
class _Action:
    func: str
    scope: str  # "Secrets", "Previous.Secrets" or "MarbleRun"
    name: str
    part: str | None
    ref: str  # as written, for messages
    at: str  # "column 7" or "line 2 column 7"


def render(template: bytes, data: TemplateData, *, kind: Kind, where: str) -> bytes:
    """Render one Files (``kind="file"``) or Env value; errors start with ``where``."""
    out = bytearray()
    for piece in _compile(template, kind=kind, where=where):
        out += piece if isinstance(piece, bytes) else _evaluate(piece, data, kind, where)
    if kind == "env" and b"\x00" in out:
        raise ManifestError(f"{where}: the rendered value contains a NUL byte")
    return bytes(out)


def render_parameters(marble: Marble, data: TemplateData) -> RenderedParameters:
    """Files and Env of ``marble`` rendered with ``data``; NoTemplates values pass through."""
    base = f"Marbles.{marble.name}.Parameters"
    files = {
        path: value.data
        if value.no_templates
        else render(value.data, data, kind="file", where=f"{base}.Files.{path}")
        for path, value in marble.parameters.files.items()
    }
    env = {
        name: value.data
        if value.no_templates
        else render(value.data, data, kind="env", where=f"{base}.Env.{name}")
        for name, value in marble.parameters.env.items()
    }
    return RenderedParameters(files, env, marble.parameters.argv)


# -- parsing ----------------------------------------------------------------------------
def _compile(template: bytes, *, kind: Kind, where: str) -> list[bytes | _Action]:
    """Literal byte runs and actions; every syntax error is raised here."""
    pieces: list[bytes | _Action] = []
    pos = 0
    while True:
        start = template.find(b"{{", pos)
        if start < 0:
            pieces.append(template[pos:])
            return [p for p in pieces if p != b""]
        text = template[pos:start]
        inner = start + 2
        if template[inner : inner + 1] == b"-" and template[inner + 1 : inner + 2] in _SPACE:
            text, inner = text.rstrip(_SPACE), inner + 1
        pieces.append(text)
        end = template.find(b"}}", inner)
        if end < 0:
            _fail(template, start, where, "unclosed action: '{{' without '}}'")
        inner_end, trim_after = end, False
        if end - 1 > inner and template[end - 1] == ord("-") and template[end - 2] in _SPACE:
            inner_end, trim_after = end - 1, True
        pieces.append(_action(template, inner, inner_end, kind, where))
        pos = end + 2
        if trim_after:
            while pos < len(template) and template[pos] in _SPACE:
                pos += 1


def _action(template: bytes, begin: int, end: int, kind: Kind, where: str) -> _Action:
    try:
        body = template[begin:end].decode("utf-8")
    except UnicodeDecodeError:
        _fail(template, begin, where, "an action {{ ... }} must be UTF-8 text")
    tokens = [(m.group(), begin + len(body[: m.start()].encode())) for m in _TOKEN.finditer(body)]
    words = [t for t, _ in tokens]
    usage = "expected {{ FUNCTION .Secrets.NAME }}, e.g. {{ pem .Secrets.cert.Cert }}"
    if not tokens:
        _fail(template, begin - 2, where, f"empty action; {usage}")
    if words[0].startswith("/*"):
        _fail(template, tokens[0][1], where, "template comments are not supported")
    if words[0] in _CONTROL:
        _fail(
            template,
            tokens[0][1],
            where,
            f"'{words[0]}' and other control actions are not supported",
        )
    if len(words) == 1 and words[0].startswith("."):
        funcs = " or ".join(_FUNCTIONS[kind])
        _fail(
            template,
            tokens[0][1],
            where,
            f"{words[0]} needs a function ({funcs}), e.g. {{{{ hex {words[0]} }}}}",
        )
    if len(words) == 2:
        (func, func_at), (ref, ref_at) = tokens
    elif len(words) == 3 and words[1] == "|":
        (ref, ref_at), _, (func, func_at) = tokens
    else:
        _fail(template, tokens[0][1], where, f"unsupported action {{{{{body}}}}}; {usage}")
    _check_function(template, func, func_at, kind, where)
    return _reference(template, func, ref, ref_at, where)


def _check_function(template: bytes, func: str, at: int, kind: Kind, where: str) -> None:
    allowed = _FUNCTIONS[kind]
    if func in allowed:
        return
    if func == "raw":
        why = "raw is only for Files; in Env use hex or base64 (or string for plain secrets)"
    elif func == "string":
        why = "string is only for Env; in Files use raw"
    elif func.startswith("-") or func.endswith("-"):
        why = f"unknown function {func!r}; a trim marker needs a space: '{{{{- ' or ' -}}}}'"
    else:
        why = f"unknown function {func!r}{suggest(func, allowed)}; one of {', '.join(allowed)}"
    _fail(template, at, where, why)


def _reference(template: bytes, func: str, ref: str, at: int, where: str) -> _Action:
    if not _REF.fullmatch(ref):
        _fail(template, at, where, f"expected a reference like .Secrets.NAME, got {ref!r}")
    fields = ref[1:].split(".")
    loc = _location(template, at)
    if fields[:2] == ["Previous", "Secrets"] and len(fields) in (3, 4):
        scope, rest = "Previous.Secrets", fields[2:]
    elif fields[0] == "Secrets" and len(fields) in (2, 3):
        scope, rest = "Secrets", fields[1:]
    elif fields[0] == "MarbleRun" and len(fields) in (2, 3):
        scope, rest = "MarbleRun", fields[1:]
        if rest[0] not in RESERVED_SECRETS:
            _fail(
                template,
                at,
                where,
                f"{ref}: .MarbleRun has {', '.join(RESERVED_SECRETS)}, not {rest[0]!r}",
            )
    else:
        _fail(
            template,
            at,
            where,
            f"{ref}: expected .Secrets.NAME[.PART], .Previous.Secrets.NAME[.PART] or "
            ".MarbleRun.NAME[.PART]",
        )
    part = rest[1] if len(rest) == 2 else None
    if part is not None and part not in _PARTS:
        _fail(template, at, where, f"{ref}: the part must be Cert, Public or Private")
    return _Action(func, scope, rest[0], part, ref, loc)


# -- evaluation -------------------------------------------------------------------------
def _evaluate(action: _Action, data: TemplateData, kind: Kind, where: str) -> bytes:
    def fail(message: str) -> ManifestError:
        return ManifestError(f"{where}: {action.at}: {action.ref}: {message}")

    table = {
        "Secrets": data.secrets,
        "Previous.Secrets": data.previous_secrets,
        "MarbleRun": data.marblerun,
    }[action.scope]
    value = table.get(action.name)
    if value is None:
        if action.scope == "Previous.Secrets" and action.name in data.secrets:
            raise fail("no previous value (the root secret has not been rotated)")
        raise fail(f"undefined secret {action.name!r}{suggest(action.name, table)}")
    if action.func == "string":
        if action.part is not None or value.type != "plain":
            raise fail("string takes a plain secret without a part: {{ string .Secrets.NAME }}")
        if b"\x00" in value.public:
            raise fail("the secret contains a NUL byte and cannot be an environment variable")
        return value.public
    if action.func == "pem":
        if action.part is None:
            raise fail("pem needs a part: .Cert, .Public or .Private")
        return _pem(_PEM_LABELS[action.part], _bytes(action, value, fail))
    raw = _bytes(action, value, fail)
    if action.func == "hex":
        return raw.hex().encode("ascii")
    if action.func == "base64":
        return base64.b64encode(raw)
    return raw


def _bytes(action: _Action, value: SecretValue, fail: _Fail) -> bytes:
    if action.part == "Cert":
        if value.cert is None:
            raise fail(f"a {value.type} secret has no certificate")
        return value.cert.public_bytes(serialization.Encoding.DER)
    if action.part == "Private":
        if value.private is None or not len(value.private):
            raise fail(f"no private key is available for this {value.type} secret")
        return value.private.reveal()
    if not value.public:
        what = "public key" if action.part == "Public" else "value (try a part: .Cert)"
        raise fail(f"no {what} is available for this {value.type} secret")
    return value.public


def _pem(label: str, der: bytes) -> bytes:
    body = base64.b64encode(der)
    lines = b"".join(body[i : i + 64] + b"\n" for i in range(0, len(body), 64))
    return b"-----BEGIN %s-----\n%s-----END %s-----\n" % (label.encode(), lines, label.encode())


def _location(template: bytes, offset: int) -> str:
    line = template.count(b"\n", 0, offset) + 1
    line_start = template.rfind(b"\n", 0, offset) + 1
    column = len(template[line_start:offset].decode("utf-8", "replace")) + 1
    return f"column {column}" if line == 1 else f"line {line} column {column}"


def _fail(template: bytes, offset: int, where: str, message: str) -> NoReturn:
    raise ManifestError(f"{where}: {_location(template, offset)}: {message}")
