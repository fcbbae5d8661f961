"""Hardware quote providers behind device paths: Gramine's ``/dev/attestation`` files and
Occlum's ``/dev/sgx`` ioctls, and ``provider_for`` to pick one by name.

Both block on the quoting enclave (tens of milliseconds): call ``get_quote`` from a
thread or before the event loop starts. The device paths are arguments so a test can lay
out the files (Gramine) or answer the ioctls (Occlum) without SGX.
"""

from __future__ import annotations

import ctypes
import difflib
import fcntl
import os
import re
from pathlib import Path
from typing import Protocol

from meshproxy._redact import Secret
from meshproxy.attestation._platform import QuoteProvider, SimulationPlatform, SimulationProvider
from meshproxy.attestation._quote import MAX_QUOTE_SIZE, EnclaveIdentity
from meshproxy.errors import AttestationError, ConfigError

PROVIDERS = ("simulation", "gramine", "occlum")
REPORT_DATA_SIZE = 64
GRAMINE_KEY_SIZE = 16  # /dev/attestation/keys/<name>: a raw 128-bit key
_KEY_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}\Z")  # not _sgx_* (read-only)


def _report_data(report_data: bytes) -> bytes:
    if len(report_data) > REPORT_DATA_SIZE:
        raise AttestationError(
            f"report-data: {len(report_data)} bytes of report data, at most 64 fit",
            check="report-data",
        )
    return bytes(report_data).ljust(REPORT_DATA_SIZE, b"\0")


def _provider_error(message: str) -> AttestationError:
    return AttestationError(f"provider: {message}", check="provider")


class GramineProvider:
    """Gramine-SGX: write 64 bytes to ``user_report_data``, read ``quote``.

    The files are per process inside Gramine, so concurrent processes do not interfere;
    within one process, callers must not interleave two quotes (the proxy makes one at a
    time)."""

    name: str = "gramine"
    simulated: bool = False

    def __init__(self, attestation_dir: Path = Path("/dev/attestation")) -> None:
        self.attestation_dir = Path(attestation_dir)

    def get_quote(self, report_data: bytes) -> bytes:
        data = _report_data(report_data)
        d = self.attestation_dir
        if not d.is_dir():
            raise _provider_error(f"not running under Gramine SGX (no {d})")
        kind = _read_optional(d / "attestation_type")
        if kind is not None and kind.strip() != b"dcap":
            raise _provider_error(
                f"{d / 'attestation_type'} says {kind.strip().decode(errors='replace')!r}: set "
                'sgx.remote_attestation = "dcap" in the Gramine manifest'
            )
        if not (d / "quote").exists():
            raise _provider_error(
                f"{d / 'quote'} is missing: this is gramine-direct, or the manifest does "
                'not set sgx.remote_attestation = "dcap"'
            )
        try:
            with (d / "user_report_data").open("wb", buffering=0) as f:
                written = f.write(data)
            if written != REPORT_DATA_SIZE:
                raise _provider_error(f"wrote {written} of 64 bytes of report data")
            with (d / "quote").open("rb") as f:
                quote = f.read(MAX_QUOTE_SIZE + 1)
        except OSError as exc:
            raise _provider_error(f"{d}: {exc.strerror or exc}") from None
        if not quote or len(quote) > MAX_QUOTE_SIZE:
            raise _provider_error(f"{d / 'quote'} gave {len(quote)} bytes, not a quote")
        return quote

    def install_key(self, name: str, key: Secret) -> Path:
        """Give Gramine the 16-byte key of the encrypted mounts whose ``key_name`` is
        ``name``: write it to ``keys/<name>`` (before the app opens such a mount). Gramine
        keeps it in enclave memory; the key is never logged or put in an error."""
        if not _KEY_NAME.match(name):
            raise _provider_error(f"{name!r} is not a Gramine key name")
        if len(key) != GRAMINE_KEY_SIZE:
            raise _provider_error(
                f"an encrypted-files key is {GRAMINE_KEY_SIZE} bytes, not {len(key)}"
            )
        keys = self.attestation_dir / "keys"
        if not keys.is_dir():
            raise _provider_error(f"not running under Gramine (no {keys})")
        path = keys / name
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
            try:
                written = os.write(fd, key.reveal())
            finally:
                os.close(fd)
        except OSError as exc:
            raise _provider_error(f"{path}: cannot set the key: {exc.strerror or exc}") from None
        if written != GRAMINE_KEY_SIZE:
            raise _provider_error(f"{path}: wrote {written} of {GRAMINE_KEY_SIZE} key bytes")
        return path


def _read_optional(path: Path) -> bytes | None:
    try:
        return path.read_bytes()[:64]
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise _provider_error(f"{path}: {exc.strerror or exc}") from None


# -- Occlum ----------------------------------------------------------------------------
class _GenDcapQuoteArg(ctypes.Structure):
    """``sgxioc_gen_dcap_quote_arg_t`` (occlum src/libos/src/fs/dev_fs/dev_sgx)."""

    _fields_ = (
        ("report_data", ctypes.POINTER(ctypes.c_uint8)),
        ("quote_len", ctypes.POINTER(ctypes.c_uint32)),
        ("quote_buf", ctypes.POINTER(ctypes.c_uint8)),
    )


def _ioc(direction: int, number: int, size: int) -> int:
    return direction << 30 | size << 16 | ord("s") << 8 | number


_IOC_READ, _IOC_WRITE = 2, 1
GET_DCAP_QUOTE_SIZE = _ioc(_IOC_READ, 7, ctypes.sizeof(ctypes.c_uint32))
GEN_DCAP_QUOTE = _ioc(_IOC_READ | _IOC_WRITE, 8, ctypes.sizeof(_GenDcapQuoteArg))


class Ioctl(Protocol):
    """``ioctl(fd, request, arg)`` where ``arg`` is a ctypes object the call fills in."""

    def __call__(self, fd: int, request: int, arg: ctypes.Structure | ctypes.c_uint32) -> int: ...


def _fcntl_ioctl(fd: int, request: int, arg: ctypes.Structure | ctypes.c_uint32) -> int:
    return fcntl.ioctl(fd, request, arg, True)  # type: ignore[no-any-return]


class OcclumProvider:
    """Occlum: ``GET_DCAP_QUOTE_SIZE`` then ``GEN_DCAP_QUOTE`` ioctls on ``/dev/sgx``."""

    name: str = "occlum"
    simulated: bool = False

    def __init__(self, device: Path = Path("/dev/sgx"), *, ioctl: Ioctl | None = None) -> None:
        self.device = Path(device)
        self._ioctl = ioctl or _fcntl_ioctl

    def get_quote(self, report_data: bytes) -> bytes:
        data = _report_data(report_data)
        try:
            fd = os.open(self.device, os.O_RDWR)
        except FileNotFoundError:
            raise _provider_error(f"not running under Occlum (no {self.device})") from None
        except OSError as exc:
            raise _provider_error(f"{self.device}: {exc.strerror or exc}") from None
        try:
            return self._quote(fd, data)
        except OSError as exc:
            raise _provider_error(
                f"{self.device}: DCAP quote ioctl failed ({exc.strerror or exc}); is the "
                "DCAP driver and quote service available to Occlum?"
            ) from None
        finally:
            os.close(fd)

    def _quote(self, fd: int, data: bytes) -> bytes:
        size = ctypes.c_uint32(0)
        self._ioctl(fd, GET_DCAP_QUOTE_SIZE, size)
        if not 0 < size.value <= MAX_QUOTE_SIZE:
            raise _provider_error(f"{self.device} reports a quote size of {size.value} bytes")
        report = (ctypes.c_uint8 * REPORT_DATA_SIZE).from_buffer_copy(data)
        length = ctypes.c_uint32(size.value)
        buf = (ctypes.c_uint8 * size.value)()
        arg = _GenDcapQuoteArg(
            ctypes.cast(report, ctypes.POINTER(ctypes.c_uint8)),
            ctypes.pointer(length),
            ctypes.cast(buf, ctypes.POINTER(ctypes.c_uint8)),
        )
        self._ioctl(fd, GEN_DCAP_QUOTE, arg)
        if not 0 < length.value <= size.value:
            raise _provider_error(f"{self.device} returned a quote of {length.value} bytes")
        return bytes(buf)[: length.value]


# -- choosing --------------------------------------------------------------------------
def provider_for(
    name: str,
    *,
    platform: SimulationPlatform | None = None,
    identity: EnclaveIdentity | None = None,
    device_root: Path | None = None,
) -> QuoteProvider:
    """The provider called ``name``. ``device_root`` stands in for ``/dev`` (tests)."""
    dev = Path("/dev") if device_root is None else Path(device_root)
    if name == "simulation":
        if platform is None or identity is None:
            raise ConfigError("the simulation provider needs a platform and an enclave identity")
        return SimulationProvider(platform, identity)
    if name == "gramine":
        return GramineProvider(dev / "attestation")
    if name == "occlum":
        return OcclumProvider(dev / "sgx")
    close = difflib.get_close_matches(name, PROVIDERS, n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    raise ConfigError(f"unknown quote provider {name!r}{hint}; known: {', '.join(PROVIDERS)}")
