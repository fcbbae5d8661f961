"""Intel collateral: signatures, validity, CRLs, TCB levels, package advisories, and
``meshproxy quote verify --collateral``. The dcap-qvl vector is the real case; a stand-in
"Intel" PKI (our own root, PCK CA, TCB signing key) makes the cases no real collateral
shows: revoked certificates, Revoked and mismatching TCB levels, foreign QEs."""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import sys
import types
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature
from cryptography.x509.oid import NameOID

import meshproxy.cli
from meshproxy.attestation import (
    INTEL_QE_VENDOR_ID,
    Collateral,
    EnclaveIdentity,
    PackagePolicy,
    ReportBody,
    SimulationPlatform,
    TrustAnchor,
    VerifiedQuote,
    check_package,
    intel_anchor,
    parse_collateral,
    pck_extension,
    simulation_anchor,
    verify_quote,
)
from meshproxy.attestation._quote import CERT_TYPE_PCK_CHAIN, encode_header, encode_v3
from meshproxy.cli import enclave as enclave_cli
from meshproxy.errors import AttestationError, PolicyError

VECTORS = Path(__file__).parent / "vectors" / "attestation"
QUOTE = (VECTORS / "dcapqvl_sgx_quote.bin").read_bytes()
COLLATERAL_JSON = (VECTORS / "dcapqvl_sgx_collateral.json").read_text()
AT = datetime.fromtimestamp(1750400000, UTC)  # inside every window of the collateral
ADVISORIES = ("INTEL-SA-00289", "INTEL-SA-00615")


def refusal(quote: bytes, anchors: list[TrustAnchor], now: datetime, c: Collateral) -> str:
    with pytest.raises(AttestationError) as info:
        verify_quote(quote, anchors, now=now, collateral=c)
    assert str(info.value).startswith(info.value.check + ": ")
    return info.value.check


def with_field(name: str, value: str) -> Collateral:
    doc = json.loads(COLLATERAL_JSON)
    doc[name] = value
    return parse_collateral(json.dumps(doc))


# -- the real vector -------------------------------------------------------------------
def test_vector_rates_configuration_and_sw_hardening_needed() -> None:
    v = verify_quote(QUOTE, [intel_anchor()], now=AT, collateral=parse_collateral(COLLATERAL_JSON))
    assert v.tcb_status == "ConfigurationAndSWHardeningNeeded"
    assert v.advisories == ADVISORIES
    assert (v.anchor, v.simulated) == ("intel", False)
    assert v.report_data.startswith(b"Hello, world!")


def test_without_collateral_the_status_is_not_evaluated() -> None:
    v = verify_quote(QUOTE, [intel_anchor()], now=AT)
    assert (v.tcb_status, v.advisories) == ("NotEvaluated", ())


def test_pck_extension_of_the_vector() -> None:
    pem = QUOTE[QUOTE.index(b"-----BEGIN CERTIFICATE-----") :]
    leaf = x509.load_pem_x509_certificates(pem.rstrip(b"\0"))[0]
    ext = pck_extension(leaf)
    assert ext.fmspc.hex().upper() == "00A067110000"
    assert ext.pce_svn == 13
    assert ext.tcb_components == (11, 11, 2, 2, 255, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0)
    assert ext.pce_id == bytes(2)
    assert len(ext.ppid) == 16


@pytest.mark.parametrize(
    "when",
    [
        datetime(2025, 7, 20, tzinfo=UTC),  # after nextUpdate
        datetime(2026, 1, 1, tzinfo=UTC),
        datetime.fromtimestamp(1750320802, UTC),  # dcap-qvl's example: before issueDate
    ],
)
def test_collateral_outside_its_window_is_expired(when: datetime) -> None:
    c = parse_collateral(COLLATERAL_JSON)
    assert refusal(QUOTE, [intel_anchor()], when, c) == "collateral-expired"


@pytest.mark.parametrize("needle", ['"tcbEvaluationDataNumber":17', '"svn":11', "INTEL-SA-00615"])
def test_flipped_byte_in_the_tcb_info_fails_its_signature(needle: str) -> None:
    doc = json.loads(COLLATERAL_JSON)
    at = doc["tcb_info"].index(needle) + len(needle) - 1
    text = doc["tcb_info"]
    flipped = text[:at] + chr(ord(text[at]) ^ 1) + text[at + 1 :]
    c = with_field("tcb_info", flipped)
    assert refusal(QUOTE, [intel_anchor()], AT, c) == "collateral-signature"


def test_flipped_byte_in_the_qe_identity_fails_its_signature() -> None:
    text = json.loads(COLLATERAL_JSON)["qe_identity"]
    c = with_field("qe_identity", text.replace('"isvprodid":1', '"isvprodid":0'))
    assert refusal(QUOTE, [intel_anchor()], AT, c) == "collateral-signature"


def test_flipped_signature_fails() -> None:
    sig = json.loads(COLLATERAL_JSON)["tcb_info_signature"]
    c = with_field("tcb_info_signature", ("0" if sig[0] != "0" else "1") + sig[1:])
    assert refusal(QUOTE, [intel_anchor()], AT, c) == "collateral-signature"


def test_collateral_for_a_simulated_quote_is_refused(tmp_path: Path) -> None:
    platform = SimulationPlatform.load_or_create(tmp_path / "p", now=AT)
    quote = platform.quote(b"", EnclaveIdentity(bytes(32), bytes(32), 1, 1, False))
    c = parse_collateral(COLLATERAL_JSON)
    assert refusal(quote, [simulation_anchor(platform)], AT, c) == "collateral-signature"


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"extra": "x"}, "unknown key 'extra'"),
        ({"pck_crl": None}, "pck_crl: expected a non-empty string"),
        ({"tcb_info_signature": "zz"}, "tcb_info_signature: not hex"),
        ({"qe_identity_signature": "00" * 63}, "63 bytes, expected 64"),
        ({"root_ca_crl": "00ff"}, "root_ca_crl: not a CRL"),
        ({"tcb_info_issuer_chain": "nope"}, "tcb_info_issuer_chain is not a PEM"),
    ],
)
def test_malformed_collateral_names_the_key(change: dict[str, Any], message: str) -> None:
    doc = json.loads(COLLATERAL_JSON)
    doc.update(change)
    with pytest.raises(AttestationError, match=message) as info:
        parse_collateral(json.dumps(doc))
    assert info.value.check == "collateral-format"


def test_missing_key_and_non_json_are_format_errors() -> None:
    doc = json.loads(COLLATERAL_JSON)
    del doc["pck_crl"]
    with pytest.raises(AttestationError, match="missing key 'pck_crl'"):
        parse_collateral(json.dumps(doc))
    for garbage in (b"", b"[1]", b"{" * 100_000, "\u00ff".encode("latin-1")):
        with pytest.raises(AttestationError) as info:
            parse_collateral(garbage)
        assert info.value.check == "collateral-format"


# -- a stand-in Intel PKI ----------------------------------------------------------------
def _der(tag: int, body: bytes) -> bytes:
    n = len(body)
    length = bytes([n]) if n < 0x80 else bytes([0x80 | 2]) + n.to_bytes(2, "big")
    return bytes([tag]) + length + body


def _oid(dotted: str) -> bytes:
    arcs = [int(a) for a in dotted.split(".")]
    out = bytearray([arcs[0] * 40 + arcs[1]])
    for arc in arcs[2:]:
        chunk = [arc & 0x7F]
        while arc := arc >> 7:
            chunk.append(0x80 | (arc & 0x7F))
        out += bytes(reversed(chunk))
    return _der(0x06, bytes(out))


def _int(n: int) -> bytes:
    return _der(0x02, n.to_bytes((n.bit_length() + 8) // 8 or 1, "big"))


SGX = "1.2.840.113741.1.13.1"
FMSPC = bytes.fromhex("00906ED50000")
QE_MRSIGNER = bytes(range(32))


def sgx_extension(components: tuple[int, ...], pce_svn: int, fmspc: bytes) -> bytes:
    def entry(oid: str, value: bytes) -> bytes:
        return _der(0x30, _oid(oid) + value)

    tcb = [entry(f"{SGX}.2.{i + 1}", _int(c)) for i, c in enumerate(components)]
    tcb += [entry(f"{SGX}.2.17", _int(pce_svn)), entry(f"{SGX}.2.18", _der(0x04, bytes(16)))]
    return _der(
        0x30,
        entry(f"{SGX}.1", _der(0x04, bytes(16)))
        + entry(f"{SGX}.2", _der(0x30, b"".join(tcb)))
        + entry(f"{SGX}.3", _der(0x04, bytes(2)))
        + entry(f"{SGX}.4", _der(0x04, fmspc))
        + entry(f"{SGX}.5", _der(0x0A, b"\x00")),
    )


def raw_sig(key: ec.EllipticCurvePrivateKey, data: bytes) -> bytes:
    r, s = decode_dss_signature(key.sign(data, ec.ECDSA(hashes.SHA256())))
    return r.to_bytes(32, "big") + s.to_bytes(32, "big")


class FakeIntel:
    """Root -> PCK CA -> PCK leaf, root -> TCB signing; quotes and collateral under them."""

    def __init__(self, now: datetime, *, components: tuple[int, ...] = (5,) * 16) -> None:
        self.now = now
        self.root_key = ec.generate_private_key(ec.SECP256R1())
        self.root = self._cert("Fake SGX Root CA", self.root_key, None, self.root_key, ca=True)
        self.ca_key = ec.generate_private_key(ec.SECP256R1())
        self.ca = self._cert(
            "Fake SGX PCK Processor CA", self.ca_key, self.root, self.root_key, ca=True
        )
        self.tcb_key = ec.generate_private_key(ec.SECP256R1())
        self.tcb = self._cert(
            "Fake SGX TCB Signing", self.tcb_key, self.root, self.root_key, ca=False
        )
        self.pck_key = ec.generate_private_key(ec.SECP256R1())
        self.ext = x509.UnrecognizedExtension(
            x509.ObjectIdentifier(SGX), sgx_extension(components, 7, FMSPC)
        )
        self.pck = self._cert(
            "Fake SGX PCK Certificate", self.pck_key, self.ca, self.ca_key, ca=False, ext=self.ext
        )
        self.anchor = TrustAnchor("intel", self.root, False, INTEL_QE_VENDOR_ID)

    def _cert(
        self,
        cn: str,
        key: ec.EllipticCurvePrivateKey,
        issuer: x509.Certificate | None,
        signer: ec.EllipticCurvePrivateKey,
        *,
        ca: bool,
        ext: x509.UnrecognizedExtension | None = None,
    ) -> x509.Certificate:
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])
        b = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(issuer.subject if issuer else name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(self.now - timedelta(days=30))
            .not_valid_after(self.now + timedelta(days=3650))
            .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
        )
        if ext is not None:
            b = b.add_extension(ext, critical=False)
        return b.sign(signer, hashes.SHA256())

    def quote(self, *, qe_svn: int = 10, qe_mrsigner: bytes = QE_MRSIGNER) -> bytes:
        body = ReportBody(bytes(16), 0, (5).to_bytes(8, "little") + bytes(8), bytes(32),
                          bytes(32), 1, 1, b"fake".ljust(64, b"\0"))  # fmt: skip
        att = ec.generate_private_key(ec.SECP256R1())
        att_pub = att.public_key().public_bytes(
            serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint
        )[1:]
        auth = bytes(range(32))
        qe = ReportBody(bytes(16), 0, (0x11).to_bytes(8, "little") + bytes(8), bytes(32),
                        qe_mrsigner, 1, qe_svn,
                        hashlib.sha256(att_pub + auth).digest() + bytes(32))  # fmt: skip
        header = encode_header(
            qe_svn=qe_svn, pce_svn=7, vendor_id=INTEL_QE_VENDOR_ID, user_data=bytes(20)
        )
        signed = header + body.to_bytes()
        pem = b"".join(c.public_bytes(serialization.Encoding.PEM) for c in (self.pck, self.ca))
        return encode_v3(
            signed,
            signature=raw_sig(att, signed),
            attestation_key=att_pub,
            qe_report=qe,
            qe_report_signature=raw_sig(self.pck_key, qe.to_bytes()),
            qe_auth_data=auth,
            cert_type=CERT_TYPE_PCK_CHAIN,
            cert_data=pem + self.root.public_bytes(serialization.Encoding.PEM),
        )

    def crl(
        self, issuer: x509.Certificate, key: ec.EllipticCurvePrivateKey, revoked: list[int]
    ) -> str:
        b = (
            x509.CertificateRevocationListBuilder()
            .issuer_name(issuer.subject)
            .last_update(self.now - timedelta(days=1))
            .next_update(self.now + timedelta(days=30))
        )
        for serial in revoked:
            b = b.add_revoked_certificate(
                x509.RevokedCertificateBuilder()
                .serial_number(serial)
                .revocation_date(self.now - timedelta(days=2))
                .build()
            )
        return b.sign(key, hashes.SHA256()).public_bytes(serialization.Encoding.DER).hex()

    def collateral(
        self,
        *,
        levels: list[dict[str, Any]] | None = None,
        qe_levels: list[dict[str, Any]] | None = None,
        fmspc: bytes = FMSPC,
        revoke_pck: bool = False,
        revoke_ca: bool = False,
        tcb_info: dict[str, Any] | None = None,
    ) -> Collateral:
        pem = serialization.Encoding.PEM
        signing_chain = (self.tcb.public_bytes(pem) + self.root.public_bytes(pem)).decode()
        info = tcb_info or {
            "id": "SGX",
            "version": 3,
            "issueDate": (self.now - timedelta(days=1)).strftime("%Y-%m-%dT%H:%M:%SZ"),
            "nextUpdate": (self.now + timedelta(days=29)).strftime("%Y-%m-%dT%H:%M:%SZ"),
            "fmspc": fmspc.hex().upper(),
            "pceId": "0000",
            "tcbType": 0,
            "tcbEvaluationDataNumber": 17,
            "tcbLevels": levels or [level(5, "UpToDate")],
        }
        identity = {
            "id": "QE",
            "version": 2,
            "issueDate": info["issueDate"],
            "nextUpdate": info["nextUpdate"],
            "tcbEvaluationDataNumber": 17,
            "miscselect": "00000000",
            "miscselectMask": "FFFFFFFF",
            "attributes": "11000000000000000000000000000000",
            "attributesMask": "FBFFFFFFFFFFFFFF0000000000000000",
            "mrsigner": QE_MRSIGNER.hex().upper(),
            "isvprodid": 1,
            "tcbLevels": qe_levels or [qe_level(8, "UpToDate")],
        }
        tcb_text = json.dumps(info, separators=(",", ":"))
        qe_text = json.dumps(identity, separators=(",", ":"))
        doc = {
            "tcb_info": tcb_text,
            "tcb_info_signature": raw_sig(self.tcb_key, tcb_text.encode()).hex(),
            "tcb_info_issuer_chain": signing_chain,
            "qe_identity": qe_text,
            "qe_identity_signature": raw_sig(self.tcb_key, qe_text.encode()).hex(),
            "qe_identity_issuer_chain": signing_chain,
            "root_ca_crl": self.crl(
                self.root, self.root_key, [self.ca.serial_number] if revoke_ca else []
            ),
            "pck_crl": self.crl(
                self.ca, self.ca_key, [self.pck.serial_number] if revoke_pck else []
            ),
            "pck_crl_issuer_chain": (
                self.ca.public_bytes(pem) + self.root.public_bytes(pem)
            ).decode(),
        }
        return parse_collateral(json.dumps(doc).encode())


def level(svn: int, status: str, *advisories: str, pce_svn: int = 7) -> dict[str, Any]:
    return {
        "tcb": {"sgxtcbcomponents": [{"svn": svn}] * 16, "pcesvn": pce_svn},
        "tcbDate": "2024-03-13T00:00:00Z",
        "tcbStatus": status,
        "advisoryIDs": list(advisories),
    }


def qe_level(isvsvn: int, status: str, *advisories: str) -> dict[str, Any]:
    return {
        "tcb": {"isvsvn": isvsvn},
        "tcbDate": "2024-03-13T00:00:00Z",
        "tcbStatus": status,
        "advisoryIDs": list(advisories),
    }


NOW = datetime(2026, 3, 1, tzinfo=UTC)


@pytest.fixture(scope="module")
def intel() -> FakeIntel:
    return FakeIntel(NOW)


def rate(intel: FakeIntel, c: Collateral, **quote: Any) -> VerifiedQuote:
    return verify_quote(intel.quote(**quote), [intel.anchor], now=NOW, collateral=c)


def test_first_matching_level_wins(intel: FakeIntel) -> None:
    c = intel.collateral(
        levels=[
            level(6, "UpToDate"),  # component 6 > 5: not this platform
            level(5, "SWHardeningNeeded", "INTEL-SA-1"),
            level(4, "OutOfDate", "INTEL-SA-2"),
        ]
    )
    v = rate(intel, c)
    assert (v.tcb_status, v.advisories) == ("SWHardeningNeeded", ("INTEL-SA-1",))


def test_pcesvn_counts_too(intel: FakeIntel) -> None:
    c = intel.collateral(levels=[level(5, "UpToDate", pce_svn=8), level(5, "OutOfDate")])
    assert rate(intel, c).tcb_status == "OutOfDate"


def test_out_of_date_qe_converges_with_the_platform(intel: FakeIntel) -> None:
    c = intel.collateral(
        levels=[level(5, "ConfigurationNeeded", "INTEL-SA-1")],
        qe_levels=[qe_level(12, "UpToDate"), qe_level(2, "OutOfDate", "INTEL-SA-9", "INTEL-SA-1")],
    )
    v = rate(intel, c, qe_svn=10)
    assert v.tcb_status == "OutOfDateConfigurationNeeded"
    assert v.advisories == ("INTEL-SA-1", "INTEL-SA-9")


def test_worse_status_wins(intel: FakeIntel) -> None:
    c = intel.collateral(
        levels=[level(5, "SWHardeningNeeded")],
        qe_levels=[qe_level(12, "UpToDate"), qe_level(2, "OutOfDate")],
    )
    assert rate(intel, c).tcb_status == "OutOfDate"


def test_tcb_info_version_2_is_read(intel: FakeIntel) -> None:
    v2 = {f"sgxtcbcomp{i:02d}svn": 5 for i in range(1, 17)} | {"pcesvn": 7}
    base = json.loads(intel.collateral().tcb_info)
    base |= {"version": 2, "tcbLevels": [{"tcb": v2, "tcbDate": "x", "tcbStatus": "UpToDate"}]}
    del base["id"]
    assert rate(intel, intel.collateral(tcb_info=base)).tcb_status == "UpToDate"


@pytest.mark.parametrize(
    ("kwargs", "check", "message"),
    [
        ({"revoke_pck": True}, "revoked", "PCK Certificate.*is revoked"),
        ({"revoke_ca": True}, "revoked", "PCK Processor CA.*is revoked"),
        ({"levels": [level(5, "Revoked")]}, "tcb", "Revoked"),
        ({"levels": [level(6, "UpToDate")]}, "tcb", "no TCB level matches"),
        ({"fmspc": bytes(6)}, "tcb", "FMSPC 000000000000"),
        ({"qe_levels": [qe_level(11, "UpToDate")]}, "tcb", "ISVSVN 10 is below"),
    ],
)
def test_refusals(intel: FakeIntel, kwargs: dict[str, Any], check: str, message: str) -> None:
    c = intel.collateral(**kwargs)
    with pytest.raises(AttestationError, match=message) as info:
        rate(intel, c)
    assert info.value.check == check


def test_foreign_quoting_enclave_fails_the_qe_identity(intel: FakeIntel) -> None:
    with pytest.raises(AttestationError, match="MRSIGNER") as info:
        rate(intel, intel.collateral(), qe_mrsigner=bytes(32))
    assert info.value.check == "qe-identity"


def test_crl_from_another_issuer_cannot_vouch(intel: FakeIntel) -> None:
    c = intel.collateral()
    other = FakeIntel(NOW)  # same names, other keys
    forged = dataclasses.replace(c, pck_crl=other.collateral().pck_crl)
    assert refusal(intel.quote(), [intel.anchor], NOW, forged) == "collateral-signature"


def test_pck_without_a_covering_crl_is_refused(intel: FakeIntel) -> None:
    """A PCK from the Platform CA, collateral with the Processor CA's CRL: fail closed."""
    platform = copy.copy(intel)
    platform.ca_key = ec.generate_private_key(ec.SECP256R1())
    platform.ca = intel._cert(
        "Fake SGX PCK Platform CA", platform.ca_key, intel.root, intel.root_key, ca=True
    )
    platform.pck = intel._cert(
        "Fake SGX PCK Certificate", intel.pck_key, platform.ca, platform.ca_key, ca=False,
        ext=intel.ext,
    )  # fmt: skip
    with pytest.raises(AttestationError, match="no CRL from the issuer") as info:
        verify_quote(platform.quote(), [intel.anchor], now=NOW, collateral=intel.collateral())
    assert info.value.check == "revoked"


def test_collateral_signed_under_another_root_fails(intel: FakeIntel) -> None:
    c = FakeIntel(NOW).collateral()
    assert refusal(intel.quote(), [intel.anchor], NOW, c) == "collateral-signature"


# -- package policy with advisories (MarbleRun semantics) ----------------------------------
IDENT = EnclaveIdentity(bytes(32), bytes(range(32)), 1, 1, False)
POLICY = PackagePolicy(
    None,
    IDENT.signer_id,
    1,
    1,
    False,
    accepted_tcb_statuses=("UpToDate", "SWHardeningNeeded", "ConfigurationAndSWHardeningNeeded"),
)


def hw(status: str, *advisories: str) -> VerifiedQuote:
    return VerifiedQuote(IDENT, bytes(64), False, "intel", status, tuple(advisories))


def test_empty_accepted_advisories_accepts_all() -> None:
    check_package(hw("SWHardeningNeeded", "INTEL-SA-1"), POLICY, allow_simulation=False)


def test_unlisted_advisory_is_refused_when_hardening_is_needed() -> None:
    policy = dataclasses.replace(POLICY, accepted_advisories=("INTEL-SA-00289",))
    with pytest.raises(PolicyError, match="not accepted by the package: INTEL-SA-00615"):
        check_package(hw("ConfigurationAndSWHardeningNeeded", *ADVISORIES), policy,
                      allow_simulation=False)  # fmt: skip
    full = dataclasses.replace(POLICY, accepted_advisories=ADVISORIES)
    check_package(hw("ConfigurationAndSWHardeningNeeded", *ADVISORIES), full,
                  allow_simulation=False)  # fmt: skip


def test_advisories_do_not_matter_for_other_statuses() -> None:
    policy = dataclasses.replace(POLICY, accepted_advisories=("INTEL-SA-1",))
    check_package(hw("UpToDate", "INTEL-SA-2"), policy, allow_simulation=False)


def test_vector_against_a_package() -> None:
    v = verify_quote(QUOTE, [intel_anchor()], now=AT, collateral=parse_collateral(COLLATERAL_JSON))
    policy = PackagePolicy(v.identity.unique_id, None, None, None, False)
    with pytest.raises(PolicyError, match="TCB status ConfigurationAndSWHardeningNeeded"):
        check_package(v, policy, allow_simulation=False)
    lenient = dataclasses.replace(
        policy,
        accepted_tcb_statuses=("UpToDate", "ConfigurationAndSWHardeningNeeded"),
        accepted_advisories=ADVISORIES,
    )
    check_package(v, lenient, allow_simulation=False)


# -- meshproxy quote verify --collateral -------------------------------------------------
@pytest.fixture
def cli(monkeypatch: pytest.MonkeyPatch) -> None:
    """Only this group's commands; other groups are other engineers' work in progress."""
    quote_group = types.ModuleType("_test_quote_group")
    quote_group.register = enclave_cli.register_quote  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "_test_quote_group", quote_group)
    monkeypatch.setattr(meshproxy.cli, "_GROUPS", ("meshproxy.cli.enclave", "_test_quote_group"))


def quote_verify(*extra: str) -> list[str]:
    return ["quote", "verify", str(VECTORS / "dcapqvl_sgx_quote.bin"), *extra]


@pytest.mark.usefixtures("cli")
def test_cli_prints_the_tcb_status_and_advisories(capsys: pytest.CaptureFixture[str]) -> None:
    collateral = str(VECTORS / "dcapqvl_sgx_collateral.json")
    assert meshproxy.cli.main(quote_verify("--collateral", collateral, "--at", "1750400000")) == 0
    out = capsys.readouterr().out
    assert "UniqueID: 33d8736db756ed4997e04ba358d27833188f1932ff7b1d156904d3f560452fbb\n" in out
    assert "ProductID: 0\nSecurityVersion: 0\nDebug: false\n" in out
    assert f"ReportData: {b'Hello, world!'.hex()}" in out
    assert "TCBStatus: ConfigurationAndSWHardeningNeeded\n" in out
    assert "Advisories: INTEL-SA-00289, INTEL-SA-00615\n" in out


@pytest.mark.usefixtures("cli")
def test_cli_names_expired_and_tampered_collateral(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    collateral = str(VECTORS / "dcapqvl_sgx_collateral.json")
    late = quote_verify("--collateral", collateral, "--at", "2025-08-01T00:00:00Z")
    assert meshproxy.cli.main(late) == 1
    err = capsys.readouterr().err
    assert "collateral-expired" in err
    assert len(err.strip().splitlines()) == 1
    doc = json.loads(COLLATERAL_JSON)
    doc["tcb_info"] = doc["tcb_info"].replace('"tcbType":0', '"tcbType":1')
    bad = tmp_path / "collateral.json"
    bad.write_text(json.dumps(doc))
    assert meshproxy.cli.main(quote_verify("--collateral", str(bad), "--at", "1750400000")) == 1
    assert "collateral-signature" in capsys.readouterr().err
    bad.write_text("{}")
    assert meshproxy.cli.main(quote_verify("--collateral", str(bad), "--at", "1750400000")) == 1
    assert "collateral-format" in capsys.readouterr().err
