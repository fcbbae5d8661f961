"""Manifest updates as pure functions of the state (MarbleRun's, marblerun.md section 6).

* A package update (a manifest with nothing but ``Packages.<name>.SecurityVersion``) raises
  minimum security versions; it needs UpdateSecurityVersion on every package it names and
  applies at once. Versions never go down, and a package pinned only by UniqueID has no
  version to raise.
* A full update replaces the manifest once enough users holding UpdateManifest have
  acknowledged the byte-identical manifest (``Config.UpdateThreshold`` of the current
  manifest, or all of them). Shared symmetric keys and user-defined values are kept while
  their definitions do not change; certificate secrets are issued again;
  ``RotateRootSecret`` keeps the old root secret as the previous one; changed RecoveryKeys
  get a new data key and new recovery secrets.
* Both make a new intermediate CA, so marbles of the old manifest and of the new one do
  not trust each other, while the root, which clients pin, stays.

Every change appends a JSON line to the update log.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import replace
from datetime import datetime
from typing import Any

from meshproxy._redact import Secret
from meshproxy.config import Node, parse_document
from meshproxy.coordinator import _recovery, _secrets
from meshproxy.coordinator._auth import updaters
from meshproxy.coordinator._persist import PendingUpdate, PersistentState
from meshproxy.errors import ManifestError
from meshproxy.manifest import Manifest, Package
from meshproxy.manifest._model import CERT_TYPES
from meshproxy.pki import create_intermediate, generate_key

_PACKAGE_KEYS = (
    "Debug", "UniqueID", "SignerID", "ProductID", "SecurityVersion", "AcceptedTCBStatuses",
    "AcceptedAdvisories",
)  # fmt: skip


def log_line(now: datetime, update: str, **fields: Any) -> str:
    """One update-log entry: MarbleRun's keys ``time`` and ``update``, then the details."""
    doc = {"time": now.strftime("%Y-%m-%dT%H:%M:%S.%fZ"), "update": update, **fields}
    return json.dumps(doc, sort_keys=False)


# -- package updates --------------------------------------------------------------------------
def is_package_update(raw: bytes) -> bool:
    """MarbleRun's ``IsUpdateManifest``: only ``Packages`` is present and non-empty."""
    try:
        doc = parse_document(raw, "update manifest", ManifestError)
    except ManifestError:
        return False
    if not isinstance(doc, dict):
        return False
    keys = {str(k).lower() for k, v in doc.items() if v not in (None, {}, [])}
    return keys == {"packages"}


def parse_package_update(
    raw: bytes, manifest: Manifest, current: Mapping[str, int]
) -> dict[str, int]:
    """Package name -> new minimum SecurityVersion; every rule broken is a ManifestError."""
    doc = parse_document(raw, "update manifest", ManifestError)
    root = Node(doc, "update manifest", "", ManifestError)
    top = root.mapping(("Packages",), case_insensitive=True)
    out: dict[str, int] = {}
    for name, node in top["Packages"].items().items():
        package = manifest.packages.get(name)
        if package is None:
            node.fail(f"no package named {name!r} in the current manifest")
        fields = node.mapping(_PACKAGE_KEYS, case_insensitive=True)
        for key, child in fields.items():
            if key != "SecurityVersion" and child.value is not None:
                child.fail("only SecurityVersion can be updated (use a full manifest update)")
        svn_node = fields.get("SecurityVersion")
        if svn_node is None or svn_node.value is None:
            node.fail("missing SecurityVersion")
        svn = svn_node.int(minimum=0, maximum=0xFFFF)
        if package.signer_id is None:
            node.fail("the package is pinned by UniqueID only: it has no SecurityVersion")
        old = effective(package, current).security_version or 0
        if svn < old:
            svn_node.fail(f"SecurityVersion may not decrease (current minimum {old})")
        out[name] = svn
    return out


def effective(package: Package, package_svn: Mapping[str, int]) -> Package:
    """The package with its SecurityVersion raised by package updates."""
    svn = package_svn.get(package.name)
    if svn is None:
        return package
    return replace(package, security_version=max(svn, package.security_version or 0))


def apply_package_update(
    s: PersistentState,
    manifest: Manifest,
    versions: Mapping[str, int],
    *,
    user: str,
    now: datetime,
    simulation: bool,
) -> PersistentState:
    inter = create_intermediate(s.root, now=now, simulated=simulation, key=generate_key())
    shared = {
        name: _secrets.make_secret(manifest.secrets[name], inter, now)
        if value.type in CERT_TYPES
        else value
        for name, value in s.shared_secrets.items()
    }
    lines = [
        log_line(now, "SecurityVersion increased", user=user, package=name, **{"new version": v})
        for name, v in sorted(versions.items())
    ]
    return replace(
        s,
        intermediate=inter,
        shared_secrets=shared,
        package_svn={**s.package_svn, **versions},
        update_log=[*s.update_log, *lines],
    )


# -- full updates ------------------------------------------------------------------------------
def progress(manifest: Manifest, pending: PendingUpdate) -> tuple[int, list[str]]:
    """(acknowledgements still needed, users who have not acknowledged)."""
    required = updaters(manifest)
    needed = manifest.config.update_threshold or len(required)
    missing_users = [u for u in required if u not in pending.acks]
    return max(needed - len(pending.acks), 0), missing_users


def apply_full_update(
    s: PersistentState,
    old: Manifest,
    new: Manifest,
    *,
    now: datetime,
    simulation: bool,
) -> tuple[PersistentState, dict[str, bytes]]:
    """The state under ``new``, and new recovery secrets if RecoveryKeys changed."""
    inter = create_intermediate(s.root, now=now, simulated=simulation, key=generate_key())
    rotate = new.config.rotate_root_secret
    root_secret, previous_root = s.root_secret, s.previous_root_secret
    previous_shared = {k: v for k, v in s.previous_shared.items() if k in new.secrets}
    if rotate:
        root_secret, previous_root = Secret(os.urandom(32)), s.root_secret
        previous_shared = {}
    shared = {}
    for name, spec in new.secrets.items():
        if not spec.shared or spec.user_defined:
            continue
        old_value = s.shared_secrets.get(name)
        keep = (
            spec.type == "symmetric-key"
            and old.secrets.get(name) == spec
            and old_value is not None
            and not rotate
        )
        shared[name] = old_value if keep and old_value else _secrets.make_secret(spec, inter, now)
        if rotate and old_value is not None and spec.type == "symmetric-key":
            previous_shared[name] = old_value
    user_secrets = {
        name: value
        for name, value in s.user_secrets.items()
        if name in new.secrets
        and name in old.secrets
        and new.secrets[name].user_defined
        and (new.secrets[name].type, new.secrets[name].size)
        == (old.secrets[name].type, old.secrets[name].size)
    }
    recovery_secrets: dict[str, bytes] = {}
    dek, info = s.dek, s.recovery
    if not s.recovery.same_keys(new.recovery_keys, new.config.recovery_threshold):
        dek, info, recovery_secrets = _recovery.generate(
            new.recovery_keys, new.config.recovery_threshold
        )
    state = replace(
        s,
        intermediate=inter,
        root_secret=root_secret,
        previous_root_secret=previous_root,
        manifest_raw=new.raw,
        shared_secrets=shared,
        previous_shared=previous_shared,
        user_secrets=user_secrets,
        package_svn={},
        pending=None,
        activations={k: v for k, v in s.activations.items() if k in new.marbles},
        instances={k: v for k, v in s.instances.items() if k in new.marbles},
        dek=dek,
        recovery=info,
    )
    return state, recovery_secrets
