"""Type stub of the C extension built from native_tls/module.c."""

from typing import Final

ENGINE_API: Final[int]
"""Version of the relay-engine interface; 0 = no engine yet (version probe only)."""

def openssl_version() -> str:
    """``OpenSSL_version(OPENSSL_VERSION)`` of the libssl this module is linked against."""
