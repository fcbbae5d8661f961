"""The mesh policy a marble receives carries the manifest's allow-list and route rules."""

from __future__ import annotations

import json
from pathlib import Path

from test_coordinator_env import World, package

from meshproxy.coordinator._api import Api
from meshproxy.coordinator.client import _mesh_policy


def test_route_rules_round_trip_from_manifest_to_marble(tmp_path: Path) -> None:
    world = World(tmp_path)
    world.set_manifest(
        {
            "Packages": {"app": package()},
            "Marbles": {"api": {"Package": "app"}, "web": {"Package": "app"}},
            "Mesh": {
                "TrustDomain": "wire.test",
                "Allow": {"api": ["web"]},
                "Routes": {
                    "api": [
                        {"Path": "/admin", "Allow": []},
                        {"PathPrefix": "/v1", "Methods": ["GET"], "Allow": ["web"]},
                    ]
                },
            },
        }
    )
    api = Api(world.core)
    try:
        doc = json.loads(json.dumps(api._mesh()))  # through JSON, as on the wire
    finally:
        api.close()
    policy = _mesh_policy(doc)
    manifest = world.core.manifest
    assert manifest is not None
    assert policy.trust_domain == "wire.test"
    assert policy.callers_of("api") == ("web",)
    assert policy.routes_of("api") == manifest.mesh.routes_of("api")
    assert policy.routes_of("api")[1].matches("GET", "/v1/items")
    assert not policy.routes_of("api")[1].matches("POST", "/v1/items")
    # A coordinator that does not send routes (an older one) means: no route rules.
    assert _mesh_policy({"trustDomain": "t", "allow": {}}).routes == {}
