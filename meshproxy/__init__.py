"""meshproxy: a confidential service mesh (coordinator, in-enclave mTLS proxy, CLI)."""

import sys

__version__ = "0.1.0"

# The simulated enclave measurement covers the package's bytecode (attestation._tree): a
# meshproxy process never writes any, so running does not change what was signed. Only an
# install (a wheel, compileall) writes it, before signing.
sys.dont_write_bytecode = True
