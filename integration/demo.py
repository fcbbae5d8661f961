"""``make demo``: a coordinator, an attested mesh of two services, and a verifying client.

Runs in a temporary directory and narrates every step; exits 0 only if the client got an
answer from the frontend, which got it from the backend, over verified identities.
"""

from __future__ import annotations

import json
import ssl
import sys
import tempfile
import time
import uuid
from pathlib import Path

from integration.harness import CONFIGS, Cluster, copy_configs, free_port


def step(text: str) -> None:
    print(f"\n\033[1m==> {text}\033[0m", flush=True)


def show(text: str) -> None:
    for line in text.rstrip().splitlines():
        print(f"    {line}")


def call_frontend(port: int, root_pem: Path, marker: str) -> dict[str, object]:
    import http.client

    ctx = ssl.create_default_context(cafile=str(root_pem))
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    conn = http.client.HTTPSConnection("localhost", port, context=ctx, timeout=15)
    conn.connect()
    cert = conn.sock.getpeercert() if conn.sock else None
    conn.request("GET", "/", headers={"X-Demo-Marker": marker})
    resp = conn.getresponse()
    body = resp.read()
    conn.close()
    if resp.status != 200:
        raise RuntimeError(f"frontend answered HTTP {resp.status}: {body!r}")
    doc = json.loads(body)
    subject = cert.get("subject", ()) if cert else ()
    doc["_server_cert_subject"] = ", ".join(f"{k}={v}" for rdn in subject for k, v in rdn)
    return doc


def main() -> int:
    start = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="meshproxy-demo-") as tmp:
        base = Path(tmp)
        ports = {p: str(free_port()) for p in ("22001", "24433", "28443", "28080")}
        conf = copy_configs(CONFIGS / "demo", base / "demo", ports)
        with Cluster(base) as c:
            step("Sign the two simulated enclaves (EGo's `ego sign`, for any app)")
            for name in ("frontend", "backend"):
                res = c.cli(
                    "enclave",
                    "sign",
                    str(conf / f"{name}.enclave.yaml"),
                    "--key",
                    str(conf / "enclave-signer.pem"),
                )
                uid = c.cli("enclave", "uniqueid", str(conf / f"{name}.enclave.signed.json"))
                show(f"{res.stdout.splitlines()[0]}: UniqueID {uid.stdout.strip()}")

            step("Start a coordinator in SIMULATION mode (state in a temporary directory)")
            c.start_coordinator(client_port=int(ports["24433"]), mesh_port=int(ports["22001"]))
            show(f"client API https://{c.client_addr}   mesh API https://{c.mesh_addr}")
            show(c.cli("status", "--coordinator", c.client_addr, "--accept-simulation").stdout)

            step("Set the manifest from configs/demo/manifest.yaml")
            res = c.cli(
                "manifest",
                "set",
                str(conf / "manifest.yaml"),
                "--coordinator",
                c.client_addr,
                "--accept-simulation",
            )
            show(res.stderr)

            step("Start the backend marble: `meshproxy run` attests, activates, then runs the app")
            backend = c.start_marble(
                "backend", conf / "backend.yaml", [sys.executable, str(conf / "backend.py")]
            )
            show(f"backend ready: mTLS on {backend.info['inbound']['api']} -> app on a Unix socket")
            step("Start the frontend marble")
            frontend = c.start_marble(
                "frontend", conf / "frontend.yaml", [sys.executable, str(conf / "frontend.py")]
            )
            show(f"frontend ready: public TLS on {frontend.info['inbound']['web']}")

            step("A client verifies the cluster with one attestation, pinned by a policy")
            root = base / "client" / "root.pem"
            res = c.cli(
                "manifest",
                "verify",
                str(conf / "manifest.yaml"),
                "--coordinator",
                c.client_addr,
                "--accept-simulation",
                "--policy",
                str(conf / "coordinator-policy.yaml"),
                "-o",
                str(root),
            )
            show(res.stdout)

            step("The client calls the frontend over TLS, trusting only the verified root")
            marker = f"demo-{uuid.uuid4().hex[:12]}"
            answer = call_frontend(int(ports["28080"]), root, marker)
            subject = answer.pop("_server_cert_subject")
            show(json.dumps(answer, indent=2))
            show(f"server certificate: {subject}")
            backend_answer = answer.get("backend")
            if not isinstance(backend_answer, dict) or backend_answer.get("marker") != marker:
                raise RuntimeError("the backend's answer did not come back through the mesh")

            step("Who called whom, with which verified identity (from the proxies' logs)")
            for proc, event in ((frontend, "outbound.connect"), (backend, "inbound.accept")):
                for ev in proc.log_events():
                    if ev.get("event") == event:
                        show(
                            f"{proc.name} proxy: {event} listener={ev.get('listener')} "
                            f"peer={ev.get('peer')} uuid={ev.get('peer_uuid', ev.get('uuid'))}"
                        )
                        break
                else:
                    raise RuntimeError(f"{proc.name} proxy logged no {event}")

            step("Stop everything")
        print(f"\ndemo finished in {time.monotonic() - start:.1f}s: OK")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except (RuntimeError, TimeoutError) as exc:
        print(f"\ndemo FAILED: {exc}", file=sys.stderr)
        sys.exit(1)
