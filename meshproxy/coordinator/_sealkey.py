"""A marble's virtual sealing key: what its Gramine encrypted mount is keyed with.

Every activated marble gets one 128-bit key (Gramine's encrypted-files keys are 16 raw
bytes, written to ``/dev/attestation/keys/<name>``). It is derived, not stored:
HKDF-SHA256 over the cluster's root secret, salted with a fixed label, with the attested
marble type and the instance UUID as info. So the same instance (same ``uuid_file``, or
pod UID) gets the same key on any node and after a coordinator restart or failover to a
replica: data it sealed opens again after rescheduling, which an SGX sealing key (bound
to one CPU) cannot do. Another marble type, or another UUID, gets another key.
``RotateRootSecret`` changes it (re-encrypt before rotating); the key never leaves the
coordinator except in the attested activation answer.
"""

from __future__ import annotations

import uuid as uuidlib

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from meshproxy._redact import Secret

SEALING_KEY_SIZE = 16
_SALT = b"meshproxy/v1/marble-sealing-key"


def marble_sealing_key(root_secret: Secret, marble_type: str, instance: uuidlib.UUID) -> Secret:
    info = marble_type.encode() + b"\0" + str(instance).encode()
    hkdf = HKDF(algorithm=hashes.SHA256(), length=SEALING_KEY_SIZE, salt=_SALT, info=info)
    return Secret(hkdf.derive(root_secret.reveal()))
