"""Test app: a grpcio server on the Unix socket named by the env var argv[1].

Service ``/probe.Probe/`` with raw-bytes messages (no protobuf, no codegen):

* ``Echo`` (unary): the request, then ``|`` and the caller identity the proxy set
  (``l5d-client-id`` and ``x-forwarded-client-cert`` metadata) as JSON;
* ``Count`` (server streaming): the request is N in ASCII; N messages ``0``..``N-1``;
* ``Sum`` (client streaming): the total length of all request messages, in ASCII;
* ``Slow`` (unary): waits for the client's deadline, prints ``slow cancelled`` when the
  cancellation arrives;
* ``Fail`` (unary): NOT_FOUND with details ``nope`` and trailing metadata ``x-why: test``;
* ``Denied`` (unary): prints ``denied reached`` (route rules must keep callers out).
"""

from __future__ import annotations

import json
import os
import sys
import threading
from concurrent import futures

import grpc


def echo(request: bytes, context: grpc.ServicerContext) -> bytes:
    meta = dict(context.invocation_metadata())
    who = {k: meta.get(k) for k in ("l5d-client-id", "x-forwarded-client-cert", "forwarded")}
    return request + b"|" + json.dumps(who).encode()


def count(request: bytes, context: grpc.ServicerContext):  # type: ignore[no-untyped-def]
    for i in range(int(request)):
        yield str(i).encode()


def total(requests, context: grpc.ServicerContext) -> bytes:  # type: ignore[no-untyped-def]
    return str(sum(len(r) for r in requests)).encode()


def slow(request: bytes, context: grpc.ServicerContext) -> bytes:
    cancelled = threading.Event()
    context.add_callback(cancelled.set)
    if cancelled.wait(30):
        print("slow cancelled", flush=True)
    return b"late"


def fail(request: bytes, context: grpc.ServicerContext) -> bytes:
    context.set_trailing_metadata((("x-why", "test"),))
    context.abort(grpc.StatusCode.NOT_FOUND, "nope")
    return b""


def denied(request: bytes, context: grpc.ServicerContext) -> bytes:
    print("denied reached", flush=True)
    return b"should not happen"


def main() -> None:
    handlers = {
        "Echo": grpc.unary_unary_rpc_method_handler(echo),
        "Count": grpc.unary_stream_rpc_method_handler(count),
        "Sum": grpc.stream_unary_rpc_method_handler(total),
        "Slow": grpc.unary_unary_rpc_method_handler(slow),
        "Fail": grpc.unary_unary_rpc_method_handler(fail),
        "Denied": grpc.unary_unary_rpc_method_handler(denied),
    }
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=16),
        handlers=[grpc.method_handlers_generic_handler("probe.Probe", handlers)],
        options=[("grpc.max_receive_message_length", 64 << 20),
                 ("grpc.max_send_message_length", 64 << 20)],
    )  # fmt: skip
    server.add_insecure_port(f"unix:{os.environ[sys.argv[1]]}")
    server.start()
    print("grpc probe serving", flush=True)
    server.wait_for_termination()


if __name__ == "__main__":
    main()
