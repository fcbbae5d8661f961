"""The manifest: MarbleRun's format, parsed strictly, plus its Files/Env templates."""

from meshproxy.manifest._check import check_templates
from meshproxy.manifest._model import (
    CertTemplate,
    FileValue,
    Manifest,
    ManifestConfig,
    Marble,
    MeshSection,
    Package,
    Parameters,
    Role,
    SecretSpec,
    TLSEntry,
    TLSTag,
    User,
    fingerprint,
)
from meshproxy.manifest._parse import parse_manifest
from meshproxy.manifest._template import (
    RenderedParameters,
    SecretValue,
    TemplateData,
    render,
    render_parameters,
)

__all__ = [
    "CertTemplate",
    "FileValue",
    "Manifest",
    "ManifestConfig",
    "Marble",
    "MeshSection",
    "Package",
    "Parameters",
    "RenderedParameters",
    "Role",
    "SecretSpec",
    "SecretValue",
    "TLSEntry",
    "TLSTag",
    "TemplateData",
    "User",
    "check_templates",
    "fingerprint",
    "parse_manifest",
    "render",
    "render_parameters",
]
