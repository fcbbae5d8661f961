"""The bench's HTTP backend (clients/httpd.c), as the proxies in front of it use it.

Built with the bench's own compiler flags and run as a real process on a Unix socket:
each test sends what a proxy or client may send (split reads, pipelined requests, bodies,
closing requests, requests it cannot frame) and checks the bytes that come back.
"""

from __future__ import annotations

import socket
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from integration.bench._procs import accepts, wait_until
from integration.bench.run import build_tools

REQ = b"GET / HTTP/1.1\r\nHost: bench\r\n\r\n"
HEAD = (
    b"HTTP/1.1 200 OK\r\nServer: bench-httpd\r\nContent-Type: text/plain\r\n"
    b"Content-Length: 100\r\nConnection: keep-alive\r\n\r\n"
)
OK = HEAD + b"x" * 100
CLOSE = HEAD.replace(b"keep-alive", b"close") + b"x" * 100


@pytest.fixture(scope="module")
def httpd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    base = tmp_path_factory.mktemp("httpd")
    build_tools(base / "bin", ("httpd",))
    sock = base / "web.sock"
    proc = subprocess.Popen(
        [str(base / "bin" / "httpd"), "600", f"unix:{sock}"], stderr=subprocess.DEVNULL
    )
    try:
        wait_until(lambda: accepts(f"unix:{sock}"), 15, "httpd")
        yield sock
    finally:
        proc.terminate()
        proc.wait(10)


def connect(sock: Path) -> socket.socket:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(5)
    s.connect(str(sock))
    return s


def read_exactly(s: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = s.recv(min(65536, n - len(data)))
        if not chunk:
            break
        data += chunk
    return data


def read_to_eof(s: socket.socket) -> bytes:
    data = b""
    while chunk := s.recv(65536):
        data += chunk
    return data


def test_pipelined_requests_split_anywhere_get_one_answer_each_in_order(httpd: Path) -> None:
    with connect(httpd) as s:
        data = REQ * 3
        for part in (data[:5], data[5:40], data[40:]):  # heads split mid-line and mid-CRLF
            s.sendall(part)
        assert read_exactly(s, 3 * len(OK)) == OK * 3
        s.sendall(REQ * 500)  # more answers than one gathered write holds
        assert read_exactly(s, 500 * len(OK)) == OK * 500


def test_a_request_body_is_skipped_and_the_next_request_answered(httpd: Path) -> None:
    with connect(httpd) as s:
        s.sendall(b"POST / HTTP/1.1\r\nContent-Length: 10\r\n\r\n01234")
        s.sendall(b"56789" + REQ)
        assert read_exactly(s, 2 * len(OK)) == OK * 2


def test_head_gets_the_same_head_without_body(httpd: Path) -> None:
    with connect(httpd) as s:
        s.sendall(b"HEAD / HTTP/1.1\r\n\r\n" + REQ)
        assert read_exactly(s, len(HEAD) + len(OK)) == HEAD + OK


def test_connection_close_and_http10_close_after_their_answer(httpd: Path) -> None:
    with connect(httpd) as s:
        s.sendall(b"GET / HTTP/1.1\r\nconnection:  Close \r\n\r\n" + REQ)
        assert read_to_eof(s) == CLOSE  # the request after it is not answered
    with connect(httpd) as s:
        s.sendall(b"GET / HTTP/1.0\r\n\r\n")
        assert read_to_eof(s) == CLOSE
    with connect(httpd) as s:
        s.sendall(b"GET / HTTP/1.0\r\nConnection: keep-alive\r\n\r\n" + REQ)
        assert read_exactly(s, 2 * len(OK)) == OK * 2


@pytest.mark.parametrize(
    "request_bytes",
    [
        b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n",
        b"POST / HTTP/1.1\r\nContent-Length: 1x\r\n\r\n",
        b"GET / HTTP/2.0\r\n\r\n",
        b"garbage\r\n\r\n",
    ],
)
def test_a_request_it_cannot_frame_gets_400_and_the_connection_closes(
    httpd: Path, request_bytes: bytes
) -> None:
    with connect(httpd) as s:
        s.sendall(request_bytes + REQ)
        answer = read_to_eof(s)
    assert answer.startswith(b"HTTP/1.1 400 Bad Request\r\n")
    assert b"Connection: close" in answer
    assert b"200 OK" not in answer  # nothing after the unframeable request is answered


def test_a_reader_slower_than_the_answers_still_gets_every_one(httpd: Path) -> None:
    count = 20000  # ~4 MB of answers: the socket fills, httpd stops reading until drained
    with connect(httpd) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sender = threading.Thread(target=s.sendall, args=(REQ * count,))
        sender.start()
        answers = read_exactly(s, count * len(OK))
        sender.join(10)
    assert answers == OK * count
