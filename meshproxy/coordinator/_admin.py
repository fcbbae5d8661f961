"""The client API's authenticated operations: secrets, updates, the update log.

Every operation first authenticates the caller's certificate against the manifest in
force (``_auth``), then authorizes the action on every resource it touches, then changes
the state through the core's ``transact`` (so it is committed before it is answered, and
recomputed if another replica committed meanwhile). Sans-IO, like the core: ``now`` is an
argument, the certificate arrives as DER bytes.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime
from typing import Any

from meshproxy.coordinator import _auth, _updates, _usersecrets
from meshproxy.coordinator._core import CoordinatorCore
from meshproxy.coordinator._persist import PendingUpdate, PersistentState
from meshproxy.coordinator._state import require
from meshproxy.errors import ManifestError, PolicyError, StateError
from meshproxy.manifest import Manifest, User, parse_manifest

log = logging.getLogger("meshproxy.coordinator")


class NotFound(StateError):
    """Nothing of the kind exists (no pending update, an unset secret): HTTP 404."""


@dataclass(frozen=True)
class UpdateStatus:
    message: str
    missing_acks: int
    missing_users: tuple[str, ...]
    recovery_secrets: dict[str, bytes] = field(repr=False)
    applied: bool = False


class Admin:
    def __init__(self, core: CoordinatorCore) -> None:
        self.core = core

    def _user(self, cert_der: bytes | None, now: datetime) -> tuple[Manifest, User]:
        manifest = self.core.current_manifest()
        return manifest, _auth.authenticate(manifest, cert_der, now)

    # -- secrets ---------------------------------------------------------------------------
    def get_secrets(
        self, cert_der: bytes | None, names: Sequence[str], *, now: datetime
    ) -> dict[str, dict[str, Any]]:
        self.core.sync()
        require(self.core.state, "read_secrets")
        manifest, user = self._user(cert_der, now)
        if not names:
            raise PolicyError("name at least one secret (?s=NAME)")
        _auth.authorize(manifest, user, "readsecret", names)
        s = self.core.persistent
        out = {}
        for name in dict.fromkeys(names):
            spec = manifest.secrets[name]  # authorize() only grants manifest secrets
            value = s.user_secrets.get(name) if spec.user_defined else s.shared_secrets.get(name)
            if value is None:
                raise NotFound(f"secret {name!r} has not been set yet")
            out[name] = _usersecrets.to_json(spec, value)
        return out

    def set_secrets(
        self, cert_der: bytes | None, uploads: Mapping[str, Any], *, now: datetime
    ) -> None:
        self.core.sync()
        require(self.core.state, "write_secrets")
        manifest, user = self._user(cert_der, now)
        if not uploads:
            raise PolicyError("no secrets given")
        unknown = [n for n in uploads if n not in manifest.secrets]
        if unknown:
            raise PolicyError(f"no secret named {', '.join(map(repr, unknown))} in the manifest")
        _auth.authorize(manifest, user, "writesecret", list(uploads))
        values = {n: _usersecrets.parse_upload(manifest.secrets[n], b) for n, b in uploads.items()}

        def change(s: PersistentState) -> PersistentState:
            merged = {**s.user_secrets, **values}
            _usersecrets.check_templates_with(self.core.current_manifest(), merged)
            lines = [
                _updates.log_line(
                    now, "Secret set", user=user.name, secret=n, type=manifest.secrets[n].type
                )
                for n in sorted(values)
            ]
            return replace(s, user_secrets=merged, update_log=[*s.update_log, *lines])

        self.core.transact(change)
        log.info("secrets set", extra={"user": user.name, "secrets": sorted(values)})

    # -- update log ------------------------------------------------------------------------
    def update_log(self) -> list[str]:
        self.core.sync()
        require(self.core.state, "read_update_log")
        return list(self.core.persistent.update_log)

    # -- updates ---------------------------------------------------------------------------
    def update(self, cert_der: bytes | None, raw: bytes, *, now: datetime) -> UpdateStatus:
        """``POST /api/v2/update``: a package update, or the start of a full update."""
        self.core.sync()
        require(self.core.state, "update")
        manifest, user = self._user(cert_der, now)
        if self.core.persistent.pending is not None:
            raise StateError(
                "a manifest update is pending: acknowledge or cancel it first "
                "(meshproxy manifest update get)"
            )
        if _updates.is_package_update(raw):
            return self._package_update(manifest, user, raw, now)
        _auth.authorize(manifest, user, "updatemanifest")
        new = parse_manifest(raw, "update manifest")
        pending = PendingUpdate(raw, (user.name,))
        missing, users = _updates.progress(manifest, pending)
        line = _updates.log_line(
            now,
            "Complete manifest update initiated",
            user=user.name,
            manifestFingerprint=new.fingerprint,
            missingAcknowledgments=missing,
            missingUsers=users,
        )
        return self._advance(manifest, new, None, pending, line, now)

    def _package_update(
        self, manifest: Manifest, user: User, raw: bytes, now: datetime
    ) -> UpdateStatus:
        versions = _updates.parse_package_update(raw, manifest, self.core.persistent.package_svn)
        _auth.authorize(manifest, user, "updatesecurityversion", list(versions))

        def change(s: PersistentState) -> PersistentState:
            if s.pending is not None or s.manifest_raw != manifest.raw:
                raise StateError("the manifest changed meanwhile; look again and retry")
            current = _updates.parse_package_update(raw, manifest, s.package_svn)
            return _updates.apply_package_update(
                s, manifest, current, user=user.name, now=now, simulation=self.core.simulation
            )

        self.core.transact(change)
        log.info("package update applied", extra={"user": user.name, "packages": versions})
        return UpdateStatus("SecurityVersion updated.", 0, (), {}, applied=True)

    def acknowledge(self, cert_der: bytes | None, raw: bytes, *, now: datetime) -> UpdateStatus:
        self.core.sync()
        require(self.core.state, "update")
        manifest, user = self._user(cert_der, now)
        _auth.authorize(manifest, user, "updatemanifest")
        pending = self._pending()
        if raw != pending.raw:
            raise PolicyError(
                "the manifest differs from the pending update: acknowledge exactly the same "
                "bytes (meshproxy manifest update get)"
            )
        if user.name in pending.acks:
            raise PolicyError(f"user {user.name!r} already acknowledged this update")
        new = parse_manifest(raw, "update manifest")
        acked = PendingUpdate(raw, (*pending.acks, user.name))
        missing, users = _updates.progress(manifest, acked)
        line = _updates.log_line(
            now,
            "Complete manifest update acknowledged",
            user=user.name,
            manifestFingerprint=new.fingerprint,
            missingAcknowledgments=missing,
            missingUsers=users,
        )
        return self._advance(manifest, new, pending, acked, line, now)

    def _advance(
        self,
        manifest: Manifest,
        new: Manifest,
        before: PendingUpdate | None,
        pending: PendingUpdate,
        line: str,
        now: datetime,
    ) -> UpdateStatus:
        missing, users = _updates.progress(manifest, pending)
        secrets: dict[str, bytes] = {}

        def check(s: PersistentState) -> None:
            if s.pending != before or s.manifest_raw != manifest.raw:
                raise StateError("the pending update changed meanwhile; look again and retry")

        if missing:

            def record(s: PersistentState) -> PersistentState:
                check(s)
                return replace(s, pending=pending, update_log=[*s.update_log, line])

            self.core.transact(record)
            return UpdateStatus(
                f"Update recorded; {missing} more acknowledgement(s) needed.",
                missing,
                tuple(users),
                {},
                applied=False,
            )

        def apply(s: PersistentState) -> PersistentState:
            check(s)
            state, fresh = _updates.apply_full_update(
                s, manifest, new, now=now, simulation=self.core.simulation
            )
            secrets.clear()
            secrets.update(fresh)
            done = _updates.log_line(
                now, "Complete manifest updated", manifestFingerprint=new.fingerprint
            )
            return replace(state, update_log=[*s.update_log, line, done])

        self.core.transact(apply)
        log.info("manifest updated", extra={"fingerprint": new.fingerprint})
        return UpdateStatus("Manifest updated.", 0, (), secrets, applied=True)

    def _pending(self) -> PendingUpdate:
        pending = self.core.persistent.pending
        if pending is None:
            raise NotFound("no manifest update is pending")
        return pending

    def pending(self) -> tuple[bytes, int, tuple[str, ...]]:
        self.core.sync()
        require(self.core.state, "update")
        pending = self._pending()
        missing, users = _updates.progress(self.core.current_manifest(), pending)
        return pending.raw, missing, tuple(users)

    def cancel(self, cert_der: bytes | None, *, now: datetime) -> None:
        self.core.sync()
        require(self.core.state, "update")
        manifest, user = self._user(cert_der, now)
        _auth.authorize(manifest, user, "updatemanifest")
        pending = self._pending()
        try:
            fingerprint = parse_manifest(pending.raw).fingerprint
        except ManifestError:
            fingerprint = ""
        line = _updates.log_line(
            now, "Complete manifest update cancelled", user=user.name,
            manifestFingerprint=fingerprint,
        )  # fmt: skip

        def change(s: PersistentState) -> PersistentState:
            if s.pending is None:
                raise NotFound("no manifest update is pending")
            return replace(s, pending=None, update_log=[*s.update_log, line])

        self.core.transact(change)
