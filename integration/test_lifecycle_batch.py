"""Many marbles activating at once share group commits: MaxActivations still holds
exactly, every answered marble is counted, unlimited marbles in the same batches are
all answered."""

from __future__ import annotations

import threading
from pathlib import Path

from integration.harness import Cluster
from integration.test_lifecycle_env import Marble, package, write_manifest
from meshproxy.coordinator import client
from meshproxy.errors import CoordinatorError

MAX = 30
MARBLES = 48


def test_max_activations_holds_exactly_under_concurrent_group_commits(tmp_path: Path) -> None:
    doc = {
        "Packages": {"app": package()},
        "Marbles": {"web": {"Package": "app", "MaxActivations": MAX}, "free": {"Package": "app"}},
    }
    with Cluster(tmp_path) as c:
        c.start_coordinator()
        path = write_manifest(tmp_path / "m.json", doc)
        c.cli("manifest", "set", str(path), "--coordinator", c.client_addr, "--accept-simulation")
        platform_dir = tmp_path / "sim-platform"
        root = client.fetch_evidence(
            c.client_addr, accept_simulation=True, platform_dir=platform_dir
        ).root
        marbles = [Marble(platform_dir, "web" if i % 4 else "free") for i in range(MARBLES)]
        counted = sum(m.marble_type == "web" for m in marbles)
        answered: list[str] = []
        refused: list[str] = []
        lock = threading.Lock()
        start = threading.Barrier(MARBLES)

        def activate(m: Marble) -> None:
            start.wait()
            try:
                activation = m.activate(c.mesh_addr, root)
            except CoordinatorError as exc:
                with lock:
                    refused.append(str(exc))
                return
            assert activation.uuid == str(m.instance)
            with lock:
                answered.append(m.marble_type)

        threads = [threading.Thread(target=activate, args=(m,)) for m in marbles]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert answered.count("free") == MARBLES - counted  # unlimited: all answered
        assert answered.count("web") == MAX
        assert len(refused) == counted - MAX
        assert all("reached MaxActivations (30)" in r for r in refused), refused
        status = client.Connection(c.client_addr, root).request("GET", "/api/v2/status")
        assert status["activations"] == {"web": MAX}
