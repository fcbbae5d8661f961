"""Fuzzing: garbled manifests and templates are refused with ManifestError, never a crash."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from meshproxy.errors import ManifestError
from meshproxy.manifest import TemplateData, parse_manifest, render
from meshproxy.manifest._check import dry_run_data

DATA = Path(__file__).parent / "data" / "manifests"
FULL_RAW = (DATA / "full.json").read_bytes()
YAML_RAW = (DATA / "mesh.yaml").read_bytes()
FULL: dict[str, Any] = json.loads(FULL_RAW)
FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])

json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=False)
    | st.text(max_size=20)
    | st.sampled_from(
        ["", "symmetric-key", "cert-rsa", "plain", "backend", "{{ raw .Secrets.x }}"]
    ),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=12), children, max_size=4)
    ),
    max_leaves=12,
)


def _accepts_or_refuses(raw: bytes) -> None:
    try:
        manifest = parse_manifest(raw, "fuzz.json")
    except ManifestError as exc:
        message = str(exc)
    else:
        assert manifest.raw == raw
        return
    assert message.startswith("fuzz.json")


def _paths(node: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    out = [prefix]
    if isinstance(node, dict):
        for key, value in node.items():
            out += _paths(value, (*prefix, key))
    elif isinstance(node, list):
        for index, value in enumerate(node):
            out += _paths(value, (*prefix, index))
    return out


PATHS = _paths(FULL)[1:]


@FUZZ
@given(st.binary(max_size=300))
def test_random_bytes(raw: bytes) -> None:
    _accepts_or_refuses(raw)


@FUZZ
@given(st.data())
def test_garbled_bytes_of_real_manifests(data: st.DataObject) -> None:
    raw = bytearray(data.draw(st.sampled_from([FULL_RAW, YAML_RAW])))
    for _ in range(data.draw(st.integers(1, 4))):
        pos = data.draw(st.integers(0, len(raw) - 1))
        action = data.draw(st.sampled_from(["flip", "delete", "insert"]))
        if action == "flip":
            raw[pos] = data.draw(st.integers(0, 255))
        elif action == "delete":
            del raw[pos : pos + data.draw(st.integers(1, 40))]
        else:
            raw[pos:pos] = data.draw(
                st.sampled_from([b"{", b"}", b"[", b'"', b"\n  ", b":", b"- "])
            )
    _accepts_or_refuses(bytes(raw))


@FUZZ
@given(st.sampled_from(PATHS), json_values, st.sampled_from(["replace", "delete", "rename"]))
def test_structured_mutations(path: tuple[Any, ...], value: Any, action: str) -> None:
    doc = copy.deepcopy(FULL)
    parent = doc
    for key in path[:-1]:
        parent = parent[key]
    last = path[-1]
    if action == "replace" or isinstance(parent, list):
        parent[last] = value
    elif action == "delete":
        del parent[last]
    else:
        parent[f"{last}{value!s:.3}"] = parent.pop(last)
    _accepts_or_refuses(json.dumps(doc).encode())


@FUZZ
@given(json_values)
def test_arbitrary_documents(value: Any) -> None:
    _accepts_or_refuses(json.dumps(value).encode())
    _accepts_or_refuses(json.dumps({"Packages": value, "Marbles": value}).encode())


TEMPLATE_PARTS = [
    "{{", "}}", "{{- ", " -}}", " ", "\n", "-", "|", "pem", "raw", "hex", "base64", "string",
    ".Secrets", ".secretAESKey", ".genericSecret", ".rsaCert", ".Cert", ".Public", ".Private",
    ".MarbleRun", ".RootCA", ".MarbleCert", ".Previous", "/*", "*/", '"', "(", ")", "é", "\x00",
]  # fmt: skip
DRY_RUN: TemplateData = dry_run_data(parse_manifest(FULL_RAW))


@settings(max_examples=300, deadline=None)
@given(
    st.lists(st.sampled_from(TEMPLATE_PARTS) | st.text(max_size=3), max_size=12),
    st.sampled_from(["file", "env"]),
)
def test_templates(parts: list[str], kind: str) -> None:
    template = "".join(parts).encode("utf-8", "surrogatepass")
    try:
        render(template, DRY_RUN, kind="file" if kind == "file" else "env", where="W")
    except ManifestError as exc:
        message = str(exc)
    else:
        return
    assert message.startswith("W: ")
