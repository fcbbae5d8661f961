"""meshproxy: a confidential service mesh (coordinator, in-enclave mTLS proxy, CLI)."""

__version__ = "0.1.0"
