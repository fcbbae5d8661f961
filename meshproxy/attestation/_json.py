"""Intel's signed JSON (TCB info v2/v3, QE identity v2) -> frozen dataclasses.

Called only on bytes whose signature verified, yet still strict about what is read (types,
ranges, sizes, known statuses): a malformation is ``AttestationError`` with check
"collateral-format" naming the key path. Keys this code does not read are ignored: they
are Intel's to add (TDX module identities, component categories), and signed.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from datetime import datetime
from typing import TypeVar

from meshproxy.attestation._chain import fail
from meshproxy.attestation._tcb import STATUSES, QeIdentity, QeTcbLevel, TcbInfo, TcbLevel

_FORMAT = "collateral-format"
_MAX_LEVELS = 256
_T = TypeVar("_T")


def loads(raw: bytes, check: str, what: str) -> object:
    try:
        return json.loads(raw)
    except (ValueError, RecursionError):  # RecursionError: absurd nesting
        raise fail(check, f"{what}: not JSON") from None


class _Obj:
    """A JSON object with a path for messages."""

    def __init__(self, value: object, path: str) -> None:
        if not isinstance(value, dict):
            raise fail(_FORMAT, f"{path}: expected an object")
        self._value: dict[str, object] = value
        self.path = path

    def has(self, key: str) -> bool:
        return key in self._value

    def get(self, key: str) -> object:
        if key not in self._value:
            raise fail(_FORMAT, f"{self.path}: missing {key!r}")
        return self._value[key]

    def integer(self, key: str, limit: int = 1 << 16) -> int:
        value = self.get(key)
        if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value < limit:
            raise fail(_FORMAT, f"{self.path}.{key}: expected an integer below {limit}")
        return value

    def text(self, key: str) -> str:
        value = self.get(key)
        if not isinstance(value, str):
            raise fail(_FORMAT, f"{self.path}.{key}: expected a string")
        return value

    def hex(self, key: str, size: int) -> bytes:
        text = self.text(key)
        try:
            value = bytes.fromhex(text)
        except ValueError:
            raise fail(_FORMAT, f"{self.path}.{key}: not hex") from None
        if len(value) != size:
            raise fail(_FORMAT, f"{self.path}.{key}: {len(value)} bytes, expected {size}")
        return value

    def time(self, key: str) -> datetime:
        text = self.text(key)
        try:
            value = datetime.fromisoformat(text)
        except ValueError:
            raise fail(_FORMAT, f"{self.path}.{key}: {text!r} is not an ISO 8601 time") from None
        if value.tzinfo is None:
            raise fail(_FORMAT, f"{self.path}.{key}: {text!r} has no time zone")
        return value

    def status(self) -> str:
        value = self.text("tcbStatus")
        if value not in STATUSES:
            raise fail(_FORMAT, f"{self.path}.tcbStatus: unknown status {value!r}")
        return value

    def advisories(self) -> tuple[str, ...]:
        if not self.has("advisoryIDs"):
            return ()
        value = self.get("advisoryIDs")
        if not isinstance(value, list) or not all(isinstance(a, str) for a in value):
            raise fail(_FORMAT, f"{self.path}.advisoryIDs: expected a list of strings")
        return tuple(value)

    def objects(self, key: str, parse: Callable[[_Obj], _T]) -> tuple[_T, ...]:
        value = self.get(key)
        if not isinstance(value, list) or not 0 < len(value) <= _MAX_LEVELS:
            raise fail(_FORMAT, f"{self.path}.{key}: expected a list of 1 to {_MAX_LEVELS}")
        return tuple(parse(_Obj(item, f"{self.path}.{key}[{i}]")) for i, item in enumerate(value))


def parse_tcb_info(raw: bytes) -> TcbInfo:
    top = _Obj(loads(raw, _FORMAT, "tcbInfo"), "tcbInfo")
    version = top.integer("version")
    if version not in (2, 3):
        raise fail(_FORMAT, f"tcbInfo.version: {version} is not supported (2 or 3)")
    return TcbInfo(
        id=top.text("id") if version >= 3 else "SGX",
        version=version,
        issue_date=top.time("issueDate"),
        next_update=top.time("nextUpdate"),
        fmspc=top.hex("fmspc", 6),
        pce_id=top.hex("pceId", 2),
        tcb_type=top.integer("tcbType"),
        tcb_evaluation_data_number=top.integer("tcbEvaluationDataNumber", 1 << 32),
        levels=top.objects("tcbLevels", _tcb_level_v3 if version >= 3 else _tcb_level_v2),
    )


def _svns(level: _Obj, key: str) -> tuple[int, ...]:
    value = level.get(key)
    if not isinstance(value, list) or len(value) != 16:
        raise fail(_FORMAT, f"{level.path}.{key}: expected 16 components")
    return tuple(
        _Obj(c, f"{level.path}.{key}[{i}]").integer("svn", 256) for i, c in enumerate(value)
    )


def _tcb_level_v3(level: _Obj) -> TcbLevel:
    tcb = _Obj(level.get("tcb"), f"{level.path}.tcb")
    return TcbLevel(
        sgx_components=_svns(tcb, "sgxtcbcomponents"),
        pce_svn=tcb.integer("pcesvn"),
        status=level.status(),
        date=level.text("tcbDate"),
        advisories=level.advisories(),
        tdx_components=_svns(tcb, "tdxtcbcomponents") if tcb.has("tdxtcbcomponents") else (),
    )


def _tcb_level_v2(level: _Obj) -> TcbLevel:
    tcb = _Obj(level.get("tcb"), f"{level.path}.tcb")
    return TcbLevel(
        sgx_components=tuple(tcb.integer(f"sgxtcbcomp{i:02d}svn", 256) for i in range(1, 17)),
        pce_svn=tcb.integer("pcesvn"),
        status=level.status(),
        date=level.text("tcbDate"),
        advisories=level.advisories(),
    )


def parse_qe_identity(raw: bytes) -> QeIdentity:
    top = _Obj(loads(raw, _FORMAT, "enclaveIdentity"), "enclaveIdentity")
    return QeIdentity(
        id=top.text("id"),
        version=top.integer("version"),
        issue_date=top.time("issueDate"),
        next_update=top.time("nextUpdate"),
        tcb_evaluation_data_number=top.integer("tcbEvaluationDataNumber", 1 << 32),
        miscselect=int.from_bytes(top.hex("miscselect", 4), "big"),
        miscselect_mask=int.from_bytes(top.hex("miscselectMask", 4), "big"),
        attributes=top.hex("attributes", 16),
        attributes_mask=top.hex("attributesMask", 16),
        mrsigner=top.hex("mrsigner", 32),
        isv_prod_id=top.integer("isvprodid"),
        levels=top.objects("tcbLevels", _qe_level),
    )


def _qe_level(level: _Obj) -> QeTcbLevel:
    tcb = _Obj(level.get("tcb"), f"{level.path}.tcb")
    return QeTcbLevel(
        isv_svn=tcb.integer("isvsvn"),
        status=level.status(),
        date=level.text("tcbDate"),
        advisories=level.advisories(),
    )
