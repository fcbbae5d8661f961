"""Strict, path-aware reading of parsed YAML/JSON trees.

Config files and manifests are parsed once at the edge. A ``Node`` wraps one value with
the file it came from and its key path, so every error names both, and unknown keys are
refused with the nearest valid key suggested:
``marble.yaml: inbound[0]: unknown key 'tls_verfy' (did you mean 'tls_verify'?)``.
"""

from __future__ import annotations

import builtins
import functools
import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

from meshproxy.errors import ConfigError, MeshError

if TYPE_CHECKING:
    import yaml


@functools.cache
def _strict_loader() -> type[yaml.SafeLoader]:
    """SafeLoader that refuses duplicate keys (a silent overwrite hides typos). Made on
    first use: PyYAML is loaded only to parse YAML (JSON documents do without it, and the
    attestation agent of ``meshproxy run`` gets its config as JSON)."""
    import yaml

    class _StrictLoader(yaml.SafeLoader):
        pass

    def construct_mapping(loader: _StrictLoader, node: yaml.MappingNode, deep: bool = False) -> Any:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            key = loader.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {key!r}", key_node.start_mark
                )
            seen.add(key)
        return loader.construct_mapping(node, deep=deep)

    _StrictLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, construct_mapping)
    return _StrictLoader


def parse_document(data: bytes, source: str, error: type[MeshError] = ConfigError) -> Any:
    """Parse YAML (a superset of JSON) into Python values; errors name the line."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise error(f"{source}: not UTF-8 text (byte {exc.start})") from None
    stripped = text.lstrip()
    if stripped.startswith("{"):
        try:
            return json.loads(text, object_pairs_hook=_json_pairs(source, error))
        except json.JSONDecodeError as exc:
            raise error(f"{source}: line {exc.lineno} column {exc.colno}: {exc.msg}") from None
    loader = _strict_loader()
    import yaml

    try:
        return yaml.load(text, Loader=loader)  # noqa: S506 (strict SafeLoader subclass)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark
        where = f"line {mark.line + 1} column {mark.column + 1}: " if mark else ""
        raise error(f"{source}: {where}{exc.problem or exc}") from None
    except yaml.YAMLError as exc:
        raise error(f"{source}: invalid YAML: {exc}") from None


def _json_pairs(source: str, error: type[MeshError]) -> Any:
    def hook(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for key, value in pairs:
            if key in out:
                raise error(f"{source}: duplicate key {key!r}")
            out[key] = value
        return out

    return hook


def load_file(path: str | Path, error: type[MeshError] = ConfigError) -> Node:
    p = Path(path)
    try:
        data = p.read_bytes()
    except FileNotFoundError:
        raise error(f"{p}: file not found") from None
    except OSError as exc:
        raise error(f"{p}: cannot read: {exc.strerror}") from None
    return Node(parse_document(data, p.name, error), p.name, "", error)


def _close_matches(word: str, options: Iterable[str], n: int = 3, cutoff: float = 0.6) -> list[str]:
    """``difflib.get_close_matches``, loaded only for a mistake (not on every start)."""
    import difflib

    return difflib.get_close_matches(word, list(options), n=n, cutoff=cutoff)


@dataclass(frozen=True)
class Node:
    """One value of a parsed document, with where it came from."""

    value: Any
    source: str
    path: str
    error: type[MeshError] = ConfigError

    # -- errors -------------------------------------------------------------------------
    def where(self) -> str:
        return f"{self.source}: {self.path}" if self.path else self.source

    def fail(self, message: str) -> NoReturn:
        raise self.error(f"{self.where()}: {message}")

    def _child(self, key: str | int, value: Any) -> Node:
        if isinstance(key, int):
            path = f"{self.path}[{key}]"
        else:
            path = f"{self.path}.{key}" if self.path else key
        return Node(value, self.source, path, self.error)

    # -- structure ----------------------------------------------------------------------
    def mapping(
        self,
        allowed: Iterable[str],
        required: Iterable[str] = (),
        *,
        case_insensitive: bool = False,
    ) -> dict[str, Node]:
        """The children of a mapping, keyed by their canonical names.

        Keys outside ``allowed`` are errors. With ``case_insensitive`` (MarbleRun's
        manifests are parsed by Go's encoding/json, which matches keys that way), a key is
        matched to its canonical spelling first.
        """
        allowed = list(allowed)
        if self.value is None:
            raw: Mapping[Any, Any] = {}
        elif isinstance(self.value, Mapping):
            raw = self.value
        else:
            self.fail(f"expected a mapping, got {_kind(self.value)}")
        canon = {k.lower(): k for k in allowed}
        out: dict[str, Node] = {}
        for key, value in raw.items():
            if not isinstance(key, str):
                self.fail(f"keys must be strings, got {key!r}")
            name = key
            if key not in allowed and case_insensitive and key.lower() in canon:
                name = canon[key.lower()]
            if name not in allowed:
                hint = _close_matches(key, allowed, n=1, cutoff=0.6)
                if not hint and case_insensitive:
                    low = _close_matches(key.lower(), list(canon), n=1, cutoff=0.6)
                    hint = [canon[low[0]]] if low else []
                suggestion = f" (did you mean {hint[0]!r}?)" if hint else ""
                self._child(key, value).fail_here(f"unknown key {key!r}{suggestion}")
            if name in out:
                self.fail(f"key {name!r} given twice (keys match case-insensitively)")
            out[name] = self._child(name, value)
        for key in required:
            if key not in out or out[key].value is None:
                self.fail(f"missing required key {key!r}")
        return out

    def fail_here(self, message: str) -> NoReturn:
        # The path of an unknown key is its parent's; the message names the key itself.
        parent = self.path.rsplit(".", 1)[0] if "." in self.path else ""
        where = f"{self.source}: {parent}" if parent else self.source
        raise self.error(f"{where}: {message}")

    def items(self) -> dict[str, Node]:
        """A mapping with free-form keys (names of marbles, packages, ...)."""
        if self.value is None:
            return {}
        if not isinstance(self.value, Mapping):
            self.fail(f"expected a mapping, got {_kind(self.value)}")
        out: dict[str, Node] = {}
        for key, value in self.value.items():
            if not isinstance(key, str) or not key:
                self.fail(f"keys must be non-empty strings, got {key!r}")
            out[key] = self._child(key, value)
        return out

    def list(self) -> list[Node]:
        if self.value is None:
            return []
        if not isinstance(self.value, list):
            self.fail(f"expected a list, got {_kind(self.value)}")
        return [self._child(i, v) for i, v in enumerate(self.value)]

    # -- scalars ------------------------------------------------------------------------
    def str(self, *, allow_empty: bool = False) -> builtins.str:
        if not isinstance(self.value, str):
            self.fail(f"expected a string, got {_kind(self.value)}")
        if not allow_empty and not self.value:
            self.fail("must not be empty")
        return self.value

    def int(self, *, minimum: int | None = None, maximum: int | None = None) -> int:
        if isinstance(self.value, bool) or not isinstance(self.value, int):
            self.fail(f"expected an integer, got {_kind(self.value)}")
        if minimum is not None and self.value < minimum:
            self.fail(f"must be at least {minimum}, got {self.value}")
        if maximum is not None and self.value > maximum:
            self.fail(f"must be at most {maximum}, got {self.value}")
        return self.value

    def bool(self) -> bool:
        if not isinstance(self.value, bool):
            self.fail(f"expected true or false, got {_kind(self.value)}")
        return self.value

    def choice(self, options: Iterable[builtins.str]) -> builtins.str:
        options = list(options)
        value = self.str()
        if value not in options:
            hint = _close_matches(value, options, n=1)
            suggestion = f" (did you mean {hint[0]!r}?)" if hint else ""
            self.fail(f"must be one of {', '.join(options)}; got {value!r}{suggestion}")
        return value

    def str_list(self) -> tuple[builtins.str, ...]:
        return tuple(n.str() for n in self.list())


def _kind(value: Any) -> str:
    if value is None:
        return "nothing (null)"
    if isinstance(value, bool):
        return f"a boolean ({value})"
    if isinstance(value, int | float):
        return f"a number ({value})"
    if isinstance(value, str):
        return f"a string ({value!r})" if len(value) < 40 else "a string"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, Mapping):
        return "a mapping"
    return type(value).__name__


def parse_duration(node: Node) -> float:
    """Seconds from ``90``, ``"90s"``, ``"30m"``, ``"24h"``, ``"1h30m"``, ``"7d"``."""
    if isinstance(node.value, int) and not isinstance(node.value, bool):
        if node.value <= 0:
            node.fail("must be a positive duration")
        return float(node.value)
    text = node.str()
    units = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
    total, number = 0.0, ""
    i = 0
    while i < len(text):
        ch = text[i]
        if ch.isdigit() or ch == ".":
            number += ch
            i += 1
            continue
        unit = "ms" if text.startswith("ms", i) else ch
        if unit not in units or not number:
            node.fail(f"invalid duration {text!r} (examples: 90s, 30m, 24h, 7d)")
        try:
            total += float(number) * units[unit]
        except ValueError:
            node.fail(f"invalid duration {text!r}")
        number = ""
        i += len(unit)
    if number or total <= 0:
        node.fail(f"invalid duration {text!r} (examples: 90s, 30m, 24h, 7d)")
    return total
