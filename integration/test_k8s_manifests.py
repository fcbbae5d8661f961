"""The Kubernetes files in integration/kubernetes/, checked offline (no cluster needed).

Every document parses; the marble configs and the manifest pass meshproxy's own strict
parsers; selectors match; marble pods start ``meshproxy run``; and the mesh rules of
``meshpeers.md`` hold (opaque ports for Linkerd, DISABLE + sniHosts for Istio, no
tlsMode label, no ports Istio reserves).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import yaml

from meshproxy.config import Node, parse_marble_config
from meshproxy.manifest import parse_manifest
from meshproxy.runtime._main import DRAIN_GRACE, SHUTDOWN_GRACE

K8S = Path(__file__).parent / "kubernetes"


def _docs() -> list[dict[str, Any]]:
    out = []
    for name in yaml.safe_load((K8S / "kustomization.yaml").read_text())["resources"]:
        for doc in yaml.safe_load_all((K8S / name).read_text()):
            assert isinstance(doc, dict), name
            doc["_file"] = name
            out.append(doc)
    return out


DOCS = _docs()


def kind(k: str) -> list[dict[str, Any]]:
    return [d for d in DOCS if d["kind"] == k]


def test_every_file_in_the_folder_is_a_resource_and_every_document_is_complete() -> None:
    listed = set(yaml.safe_load((K8S / "kustomization.yaml").read_text())["resources"])
    assert listed == {p.name for p in K8S.glob("*.yaml")} - {"kustomization.yaml"}
    for d in DOCS:
        assert d["apiVersion"], d["_file"]
        assert d["metadata"]["name"], d["_file"]
        if d["kind"] != "Namespace":
            assert d["metadata"]["namespace"] == "meshproxy", d["_file"]


def _marble_configs() -> dict[str, dict[str, Any]]:
    return {
        cm["metadata"]["name"]: yaml.safe_load(cm["data"]["marble.yaml"])
        for cm in kind("ConfigMap")
        if "marble.yaml" in cm["data"]
    }


@pytest.mark.parametrize("name", sorted(_marble_configs()))
def test_marble_configs_pass_the_strict_parser(name: str) -> None:
    doc = _marble_configs()[name]
    cfg = parse_marble_config(Node(doc, f"{name}/marble.yaml", ""), base_dir=K8S, source=K8S)
    assert str(cfg.coordinator.address) == "coordinator.meshproxy.svc.cluster.local:2001"


def test_the_manifest_passes_the_strict_parser_and_covers_every_marble() -> None:
    manifest = parse_manifest((K8S / "manifest.json").read_bytes())
    types = {c["marble"]["type"] for c in _marble_configs().values()}
    assert types == set(manifest.marbles)
    assert manifest.mesh.callers_of("backend") == ("frontend",)
    assert manifest.mesh.routes_of("backend")


def test_deployments_select_their_pods_and_marbles_start_meshproxy_run() -> None:
    deployments = kind("Deployment")
    assert {d["metadata"]["name"] for d in deployments} == {"coordinator", "backend", "frontend"}
    for d in deployments:
        spec = d["spec"]
        labels = spec["template"]["metadata"]["labels"]
        assert spec["selector"]["matchLabels"].items() <= labels.items()
        assert "security.istio.io/tlsMode" not in labels  # I4
        for c in spec["template"]["spec"]["containers"]:
            assert c["image"]
            if d["metadata"]["name"] != "coordinator":
                assert c["command"][:4] == [
                    "meshproxy",
                    "run",
                    "--config",
                    "/etc/meshproxy/marble.yaml",
                ]
                assert c["command"][4] == "--"
                mounts = {m["mountPath"] for m in c["volumeMounts"]}
                assert "/etc/meshproxy/marble.yaml" in mounts
                assert "/run/meshproxy/admin.sock" in json.dumps(c["readinessProbe"])
        if d["metadata"]["name"] != "coordinator":
            # room for meshproxy's drain on SIGTERM: the app's grace, then in-flight HTTP
            grace = spec["template"]["spec"]["terminationGracePeriodSeconds"]
            assert grace >= SHUTDOWN_GRACE + DRAIN_GRACE


def test_services_route_to_pods_and_mark_our_tls_ports_opaque() -> None:
    pods = {d["metadata"]["name"]: d["spec"]["template"] for d in kind("Deployment")}
    for svc in kind("Service"):
        name = svc["metadata"]["name"]
        template = pods[name]
        assert svc["spec"]["selector"].items() <= template["metadata"]["labels"].items()
        ports = [p["port"] for p in svc["spec"]["ports"]]
        opaque = {
            int(p)
            for p in svc["metadata"]["annotations"]["config.linkerd.io/opaque-ports"].split(",")
        }
        assert opaque == set(ports)  # L4: no 10 s detection stall on our ports
        for p in svc["spec"]["ports"]:
            assert p["appProtocol"] == "tls"  # opaque to Linkerd, TLS (SNI) to Istio
            assert not 15000 <= p["port"] <= 15090  # I7
            assert p["port"] not in (4143, 4191)  # Linkerd's proxy ports
        pod_opaque = (
            template["metadata"].get("annotations", {}).get("config.linkerd.io/opaque-ports")
        )
        assert pod_opaque is None or {int(p) for p in pod_opaque.split(",")} == opaque


def test_istio_passes_our_tls_through_and_routes_it_by_the_sni_we_send() -> None:
    rules = {d["spec"]["host"]: d for d in kind("DestinationRule")}
    services = {f"{s['metadata']['name']}.meshproxy.svc.cluster.local" for s in kind("Service")}
    assert set(rules) == services
    for rule in rules.values():
        assert rule["spec"]["trafficPolicy"]["tls"]["mode"] == "DISABLE"  # I5
    sent = set()
    for cfg in _marble_configs().values():
        for out in cfg.get("outbound", []):
            sent.add(out.get("sni") or out["upstream"].rsplit(":", 1)[0])
    (vs,) = kind("VirtualService")
    hosts = set(vs["spec"]["hosts"])
    for route in vs["spec"]["tls"]:
        for match in route["match"]:
            assert set(match["sniHosts"]) <= hosts  # Istio requires it
            assert sent & set(match["sniHosts"])  # and our outbound really sends it
        for dest in route["route"]:
            assert dest["destination"]["host"] in services
