"""Files/Env templates: every function, its misuse, trimming, and the dry run."""

from __future__ import annotations

import base64
import dataclasses
import datetime
import json
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from meshproxy._redact import Secret
from meshproxy.errors import ManifestError
from meshproxy.manifest import (
    SecretValue,
    TemplateData,
    check_templates,
    parse_manifest,
    render,
    render_parameters,
)

DATA = Path(__file__).parent / "data" / "manifests"
AES = bytes(range(16))
OLD_AES = bytes(range(100, 116))
PLAIN = b"s3cr3t-token"


@pytest.fixture(scope="module")
def cert_secret() -> SecretValue:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "template test")])
    start = datetime.datetime(2024, 1, 1, tzinfo=datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(7)
        .not_valid_before(start)
        .not_valid_after(start + datetime.timedelta(days=1))
        .sign(key, hashes.SHA256())
    )
    public = key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    private = key.private_bytes(
        serialization.Encoding.DER,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    return SecretValue("cert-ecdsa", cert, public, Secret(private))


@pytest.fixture(scope="module")
def data(cert_secret: SecretValue) -> TemplateData:
    secrets = {
        "aes": SecretValue("symmetric-key", None, AES, Secret(AES)),
        "token": SecretValue("plain", None, PLAIN, Secret(PLAIN)),
        "nul": SecretValue("plain", None, b"a\x00b", Secret(b"a\x00b")),
        "tls": cert_secret,
    }
    root_only = SecretValue("cert", cert_secret.cert, b"", None)
    marblerun = {
        "RootCA": root_only,
        "MarbleCert": cert_secret,
        "CoordinatorRoot": root_only,
        "CoordinatorIntermediate": root_only,
    }
    previous = {"aes": SecretValue("symmetric-key", None, OLD_AES, Secret(OLD_AES))}
    return TemplateData(secrets, previous, marblerun)


def file(template: str | bytes, data: TemplateData) -> bytes:
    raw = template.encode() if isinstance(template, str) else template
    return render(raw, data, kind="file", where="Marbles.m.Parameters.Files./f")


def env(template: str, data: TemplateData) -> bytes:
    return render(template.encode(), data, kind="env", where="Marbles.m.Parameters.Env.E")


def refused(kind: str, template: str, data: TemplateData, *fragments: str) -> str:
    with pytest.raises(ManifestError) as info:
        (file if kind == "file" else env)(template, data)
    message = str(info.value)
    for fragment in fragments:
        assert fragment in message
    return message


# -- functions --------------------------------------------------------------------------
def test_pem_cert_public_private(data: TemplateData, cert_secret: SecretValue) -> None:
    assert cert_secret.cert is not None
    assert cert_secret.private is not None
    out = file("{{ pem .Secrets.tls.Cert }}", data)
    assert out.startswith(b"-----BEGIN CERTIFICATE-----\n")
    assert x509.load_pem_x509_certificate(out) == cert_secret.cert
    public = env("{{ pem .Secrets.tls.Public }}", data)
    assert public.startswith(b"-----BEGIN PUBLIC KEY-----\n")
    assert (
        serialization.load_pem_public_key(public).public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        == cert_secret.public
    )
    private = file("{{ pem .Secrets.tls.Private }}", data)
    assert private.startswith(b"-----BEGIN PRIVATE KEY-----\n")
    assert serialization.load_pem_private_key(private, None) is not None
    # Lines are 64 characters, as Go's pem.EncodeToMemory writes them.
    assert all(len(line) <= 64 for line in private.splitlines())


def test_raw_gives_bytes(data: TemplateData, cert_secret: SecretValue) -> None:
    assert cert_secret.cert is not None
    assert cert_secret.private is not None
    assert file("{{ raw .Secrets.aes }}", data) == AES
    assert file("{{ raw .Secrets.aes.Private }}", data) == AES
    assert file("{{ raw .Secrets.tls.Cert }}", data) == cert_secret.cert.public_bytes(
        serialization.Encoding.DER
    )
    assert file("{{ raw .Secrets.tls.Private }}", data) == cert_secret.private.reveal()
    # Without a part, a key pair means its public key (MarbleRun's raw rules).
    assert file("{{ raw .Secrets.tls }}", data) == cert_secret.public


def test_hex_and_base64(data: TemplateData) -> None:
    assert env("{{ hex .Secrets.aes }}", data) == AES.hex().encode()
    assert file("key={{ base64 .Secrets.aes }};", data) == b"key=" + base64.b64encode(AES) + b";"
    assert env("{{ base64 .Secrets.token }}", data) == base64.b64encode(PLAIN)


def test_string_for_plain_secrets_in_env(data: TemplateData) -> None:
    assert env("TOKEN={{ string .Secrets.token }}", data) == b"TOKEN=" + PLAIN


def test_pipe_form(data: TemplateData) -> None:
    assert env("{{ .Secrets.aes | hex }}", data) == AES.hex().encode()
    assert env("{{.Secrets.aes|hex}}", data) == AES.hex().encode()


def test_marblerun_and_previous_secrets(data: TemplateData, cert_secret: SecretValue) -> None:
    assert cert_secret.cert is not None
    assert x509.load_pem_x509_certificate(env("{{ pem .MarbleRun.RootCA.Cert }}", data))
    assert env("{{ pem .MarbleRun.MarbleCert.Private }}", data).startswith(b"-----BEGIN PRIV")
    assert env("{{ hex .Previous.Secrets.aes }}", data) == OLD_AES.hex().encode()


def test_literal_text_and_binary_pass_through(data: TemplateData) -> None:
    blob = b"\x00\xff}} {not an action}\n"
    assert file(blob, data) == blob
    assert file(b"\xff{{ hex .Secrets.aes }}\xfe", data) == b"\xff" + AES.hex().encode() + b"\xfe"


# -- trimming markers -------------------------------------------------------------------
def test_trim_markers_remove_adjacent_whitespace(data: TemplateData) -> None:
    out = file("a \t\n {{- hex .Secrets.aes -}} \n\n b", data)
    assert out == b"a" + AES.hex().encode() + b"b"
    assert file("a {{- hex .Secrets.aes }} b", data) == b"a" + AES.hex().encode() + b" b"
    assert file("a {{ hex .Secrets.aes -}}\n b", data) == b"a " + AES.hex().encode() + b"b"


def test_dash_without_space_is_not_a_trim_marker(data: TemplateData) -> None:
    refused("file", "a {{-hex .Secrets.aes}}", data, "column 5", "a trim marker needs a space")


# -- misuse -----------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("kind", "template", "fragments"),
    [
        ("file", "{{ .Secrets.aes }}", ("column 4", "needs a function", "{{ hex .Secrets.aes }}")),
        ("file", "{{ hexx .Secrets.aes }}", ("column 4", "unknown function 'hexx'", "'hex'")),
        ("env", "{{ raw .Secrets.aes }}", ("column 4", "raw is only for Files")),
        ("file", "{{ string .Secrets.token }}", ("column 4", "string is only for Env")),
        ("env", "{{ string .Secrets.aes }}", ("column 11", "string takes a plain secret")),
        ("env", "{{ string .Secrets.token.Public }}", ("string takes a plain secret",)),
        ("env", "{{ string .Secrets.nul }}", ("NUL byte",)),
        ("file", "{{ pem .Secrets.aes }}", ("pem needs a part",)),
        ("file", "{{ pem .Secrets.tls }}", ("pem needs a part",)),
        ("file", "{{ raw .Secrets.aes.Cert }}", ("a symmetric-key secret has no certificate",)),
        ("file", "{{ raw .Secrets.tls.Key }}", ("the part must be Cert, Public or Private",)),
        ("file", "{{ pem .MarbleRun.RootCA.Private }}", ("no private key is available",)),
        ("file", "{{ raw .MarbleRun.RootCA }}", ("no value",)),
        ("file", "{{ pem .MarbleRun.Root.Cert }}", (".MarbleRun has RootCA, MarbleCert",)),
        ("file", "{{ hex .Secrets.ase }}", ("undefined secret 'ase' (did you mean 'aes'?)",)),
        ("file", "{{ hex .Previous.Secrets.tls }}", ("no previous value",)),
        ("file", "{{ hex .Secret.aes }}", ("expected .Secrets.NAME[.PART]",)),
        ("file", "{{ hex .Secrets }}", ("expected .Secrets.NAME[.PART]",)),
        ("file", "{{ hex Secrets.aes }}", ("expected a reference like .Secrets.NAME",)),
        ("file", "{{ hex .Secrets.aes .Secrets.aes }}", ("unsupported action",)),
        ("file", '{{ "text" }}', ("unsupported action",)),
        ("file", "{{ if .Secrets.aes }}x{{ end }}", ("'if' and other control actions",)),
        ("file", "{{/* note */}}", ("comments are not supported",)),
        ("file", "{{ }}", ("column 1", "empty action")),
        ("file", "{{- -}}", ("empty action",)),
        ("file", "abc {{ hex .Secrets.aes ", ("column 5", "unclosed action")),
        ("file", "{{ hex .Secrets.aes | base64 }}", ("unsupported action",)),
    ],
)
def test_misuse_is_refused_with_where_and_column(
    kind: str, template: str, fragments: tuple[str, ...], data: TemplateData
) -> None:
    where = "Marbles.m.Parameters.Files./f" if kind == "file" else "Marbles.m.Parameters.Env.E"
    message = refused(kind, template, data, *fragments)
    assert message.startswith(f"{where}: ")


def test_column_and_line_in_multiline_templates(data: TemplateData) -> None:
    message = refused("file", "first line\n  x {{ nope .Secrets.aes }}", data)
    assert ": line 2 column 8: unknown function 'nope'" in message


def test_errors_never_show_secret_bytes(data: TemplateData) -> None:
    message = refused("env", "{{ string .Secrets.nul }}", data)
    assert "a\x00b" not in message
    assert "610062" not in message
    message = refused("env", "{{ string .Secrets.aes }}", data)
    assert AES.hex() not in message


# -- parameters and the dry run ---------------------------------------------------------
def test_render_parameters(data: TemplateData) -> None:
    manifest_text = json.loads((DATA / "full.json").read_text())
    env_values = manifest_text["Marbles"]["backendFirst"]["Parameters"]["Env"]
    env_values.pop("API_TOKEN")  # the test data names the plain secret "token"
    env_values["TOKEN"] = "{{ string .Secrets.token }}"
    marble_doc = manifest_text["Marbles"]["backendFirst"]
    marble_doc["Parameters"]["Files"] = {
        "/key": "{{ raw .Secrets.aes }}",
        "/lit": {"Data": "{{ raw .Secrets.missing }}", "NoTemplates": True},
    }
    for name in ("DB_KEY", "ROOT_CA", "MARBLE_CERT", "MARBLE_KEY"):
        env_values.pop(name)
    manifest_text["Secrets"]["token"] = {"Type": "plain", "UserDefined": True}
    manifest_text["Secrets"]["aes"] = {"Type": "symmetric-key", "Size": 128}
    m = parse_manifest(json.dumps(manifest_text).encode())
    rendered = render_parameters(m.marbles["backendFirst"], data)
    assert rendered.files["/key"] == AES
    assert rendered.files["/lit"] == b"{{ raw .Secrets.missing }}"
    assert rendered.env["TOKEN"] == PLAIN
    assert rendered.env["LITERAL"] == b"{{ not a template }}"
    assert rendered.argv == ("./backend", "--first", "serve")


def test_render_parameters_names_the_key(data: TemplateData) -> None:
    m = parse_manifest((DATA / "full.json").read_bytes())
    with pytest.raises(ManifestError) as info:
        render_parameters(m.marbles["backendFirst"], data)
    # full.json uses secrets this TemplateData does not have.
    assert str(info.value).startswith("Marbles.backendFirst.Parameters.")
    assert "undefined secret" in str(info.value)


def test_check_templates_catches_an_undefined_secret() -> None:
    m = parse_manifest((DATA / "full.json").read_bytes())
    check_templates(m)  # the fixture is consistent
    without = dict(m.secrets)
    del without["secretAESKey"]
    broken = dataclasses.replace(m, secrets=without)
    with pytest.raises(ManifestError) as info:
        check_templates(broken)
    message = str(info.value)
    assert message.startswith("Marbles.backendFirst.Parameters.")
    assert "undefined secret 'secretAESKey'" in message


def test_parse_runs_the_dry_run_with_source_and_path() -> None:
    doc = {
        "Packages": {"p": {"Debug": True}},
        "Marbles": {"m": {"Package": "p", "Parameters": {"Env": {"K": "{{ raw .Secrets.k }}"}}}},
        "Secrets": {"k": {"Type": "symmetric-key", "Size": 128}},
    }
    with pytest.raises(ManifestError) as info:
        parse_manifest(json.dumps(doc).encode(), "m.json")
    assert str(info.value) == (
        "m.json: Marbles.m.Parameters.Env.K: column 4: raw is only for Files; in Env use hex "
        "or base64 (or string for plain secrets)"
    )


def test_dry_run_skips_no_templates_values() -> None:
    doc = {
        "Packages": {"p": {"Debug": True}},
        "Marbles": {
            "m": {
                "Package": "p",
                "Parameters": {"Files": {"/x": {"Data": "{{ oops }}", "NoTemplates": True}}},
            }
        },
    }
    m = parse_manifest(json.dumps(doc).encode())
    assert m.marbles["m"].parameters.files["/x"].data == b"{{ oops }}"
