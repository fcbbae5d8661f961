"""The manifest: MarbleRun's format, parsed strictly, plus its Files/Env templates."""

from meshproxy.manifest._check import check_templates
from meshproxy.manifest._connections import routes_from_wire, routes_to_wire
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
    RouteRule,
    SecretSpec,
    TLSEntry,
    TLSTag,
    User,
    fingerprint,
    path_problem,
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
    "RouteRule",
    "SecretSpec",
    "SecretValue",
    "TLSEntry",
    "TLSTag",
    "TemplateData",
    "User",
    "check_templates",
    "fingerprint",
    "parse_manifest",
    "path_problem",
    "render",
    "render_parameters",
    "routes_from_wire",
    "routes_to_wire",
]
