"""Coordinator replicas on etcd: shared state, MaxActivations across replicas, a replica
killed during activations, and a new one that joins by getting the key from a peer.

Every replica runs on its own simulated machine (platform directory), so none can open
the others' sealed copy of the state key: replicas 2, 3 and 4 get it from a peer over the
attested key exchange, and trust the other machines' simulation roots explicitly.
"""

from __future__ import annotations

import random
import signal
import threading
import uuid
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from pathlib import Path

from integration.harness import Cluster, Proc, wait_for
from integration.test_lifecycle_env import Marble, etcd_server, package, write_manifest
from meshproxy.attestation import SimulationPlatform
from meshproxy.coordinator import client
from meshproxy.errors import ConnectError, CoordinatorError

MAX = 20
ATTEMPTS = 44


def start_replica(c: Cluster, n: int, etcd: str, machines: list[Path]) -> Proc:
    extra = ["--simulation", "--store", "etcd", "--etcd-endpoints", etcd,
             "--platform-dir", str(machines[n])]  # fmt: skip
    for i, m in enumerate(machines):
        if i != n:
            extra += ["--trust-sim-platform", str(m)]
    return c.start_coordinator(name=f"replica-{n}", state_dir=c.base / f"replica-{n}",
                               extra=extra)  # fmt: skip


def test_replicas_share_state_survive_a_kill_and_admit_a_new_member(tmp_path: Path) -> None:
    machines = [tmp_path / f"machine-{i}" for i in range(4)]
    for m in machines:
        SimulationPlatform.load_or_create(m, now=datetime.now(UTC))
    with etcd_server(tmp_path) as etcd, Cluster(tmp_path) as c:
        replicas = [start_replica(c, n, etcd.url, machines) for n in range(3)]
        for n in (1, 2):
            assert "received the state key from a peer replica" in replicas[n].log.read_text()
        path = write_manifest(
            tmp_path / "m.json",
            {
                "Packages": {"app": package()},
                "Marbles": {"web": {"Package": "app", "MaxActivations": MAX}},
            },
        )
        first = replicas[0].info["client"]
        c.cli("manifest", "set", str(path), "--coordinator", first, "--accept-simulation",
              "--platform-dir", str(machines[0]))  # fmt: skip
        root = client.fetch_evidence(first, accept_simulation=True, platform_dir=machines[0]).root
        for r in replicas:  # every replica serves the manifest set through the first
            status = client.Connection(r.info["client"], root).request("GET", "/api/v2/status")
            assert status["code"] == 3

        mesh = {n: r.info["mesh"] for n, r in enumerate(replicas)}
        alive = set(mesh)
        lock = threading.Lock()
        successes: list[str] = []
        transport_failures: list[str] = []
        refusals: list[str] = []
        kill_after = 8

        def attempt(i: int) -> None:
            marble = Marble(machines[0], "web")
            marble.instance = uuid.uuid5(uuid.NAMESPACE_OID, f"web-{i}")
            rng = random.Random(i)
            for _ in range(6):
                with lock:
                    target = rng.choice(sorted(alive))
                try:
                    marble.activate(mesh[target], root)
                except ConnectError:
                    with lock:
                        transport_failures.append(str(marble.instance))
                    continue  # the replica died under us: try another one, same UUID
                except CoordinatorError as exc:
                    with lock:
                        refusals.append(str(exc))
                    return
                with lock:
                    successes.append(str(marble.instance))
                    if len(successes) == kill_after and 1 in alive:
                        alive.discard(1)
                        replicas[1].popen.send_signal(signal.SIGKILL)
                return

        with ThreadPoolExecutor(max_workers=6) as pool:
            list(pool.map(attempt, range(ATTEMPTS)))

        assert replicas[1].popen.wait(10) == -signal.SIGKILL
        counted = client.Connection(replicas[0].info["client"], root).request(
            "GET", "/api/v2/status"
        )["activations"]["web"]
        # MaxActivations held across replicas, and nothing was counted twice or lost: every
        # success is counted; the only counted activations without an answer are those in
        # flight on the replica that was killed.
        assert counted == MAX
        assert len(set(successes)) == len(successes)
        assert len(successes) <= counted <= len(successes) + len(transport_failures)
        assert refusals  # the limit was reached, and said so
        assert all("reached MaxActivations (20)" in r for r in refusals), refusals

        # A fourth replica joins on a new machine and gets the key from a live peer.
        fourth = start_replica(c, 3, etcd.url, machines)
        assert "received the state key from a peer replica" in fourth.log.read_text()
        status = client.Connection(fourth.info["client"], root).request("GET", "/api/v2/status")
        assert status["code"] == 3
        assert status["activations"] == {"web": MAX}
        # Every answered activation is on record: its marble can renew through any replica.
        for instance in successes[:5]:
            marble = Marble(machines[0], "web")
            marble.instance = uuid.UUID(instance)
            renewal = marble.renew(fourth.info["mesh"], root)
            assert renewal.root == root
        chains = {
            c.cli("certificate", "intermediate", "--coordinator", r.info["client"],
                  "--root", str(_write_root(tmp_path, root))).stdout
            for r in (replicas[0], replicas[2], fourth)
        }  # fmt: skip
        assert len(chains) == 1


def _write_root(tmp: Path, root: object) -> Path:
    from meshproxy.pki import cert_to_pem

    path = tmp / "root.pem"
    path.write_bytes(cert_to_pem(root))  # type: ignore[arg-type]
    return path


def test_a_replica_locked_out_at_start_unlocks_when_a_peer_comes_back(tmp_path: Path) -> None:
    machines = [tmp_path / f"machine-{i}" for i in range(2)]
    for m in machines:
        SimulationPlatform.load_or_create(m, now=datetime.now(UTC))
    with etcd_server(tmp_path) as etcd, Cluster(tmp_path) as c:
        first = start_replica(c, 0, etcd.url, machines)
        path = write_manifest(
            tmp_path / "m.json",
            {"Packages": {"app": package()}, "Marbles": {"web": {"Package": "app"}}},
        )
        c.cli("manifest", "set", str(path), "--coordinator", first.info["client"],
              "--accept-simulation", "--platform-dir", str(machines[0]))  # fmt: skip
        root = client.fetch_evidence(
            first.info["client"], accept_simulation=True, platform_dir=machines[0]
        ).root
        first.stop()
        # Alone on a new machine, with no peer to ask: recovery mode, state untouched.
        lonely = start_replica(c, 1, etcd.url, machines)
        status = client.Connection(lonely.info["client"], None).request("GET", "/api/v2/status")
        assert status["code"] == 1
        back = start_replica(c, 0, etcd.url, machines)  # opens with its own sealed key
        wait_for(
            lambda: (
                client.Connection(lonely.info["client"], None).request("GET", "/api/v2/status")[
                    "code"
                ]
                == 3
            ),
            30,
            "the locked-out replica to get the key from its peer",
        )
        # It now serves the cluster's root, and so does the peer.
        for r in (lonely, back):
            client.Connection(r.info["client"], root).request("GET", "/api/v2/manifest")
        Marble(machines[0], "web").activate(lonely.info["mesh"], root)
