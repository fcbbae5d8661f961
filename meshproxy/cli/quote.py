"""``meshproxy quote verify``: lives with the enclave commands, registered as its own group."""

from meshproxy.cli.enclave import register_quote as register

__all__ = ["register"]
