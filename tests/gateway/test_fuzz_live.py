"""Property: whatever the request path, headers and body, a live gateway answers with
a 4xx or a correct answer, never a 5xx (its backends are healthy) and never a crash.

The gateway and two fake backends run on 127.0.0.1 in a thread with their own event
loop; hypothesis sends raw HTTP/1.1 over a socket, so nothing client-side cleans the
input up first."""

from __future__ import annotations

import asyncio
import json
import socket
import threading
from collections.abc import Iterator
from concurrent.futures import Future

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.gateway.harness import fake_stack

PATHS = ["/v1/completions", "/v1/chat/completions", "/v1/models", "/v1/", "/", "/healthz", "/kvgate/status",
         "/v1/completions/", "http://h/v1/completions", "/v1/../v1/completions", "/v1/%2e%2e/x", "/v1%2fx",
         "/v1/completions;a=1", "//v1/completions", "/v1/completions?stream=true"]
SUFFIX = st.text(alphabet="abc/.%2efF;?=&~_-+@:", max_size=12)
TOKEN = st.text(alphabet="abcdefghijklmnopqrstuvwxyzABCXYZ0123456789-_!#$%&'*+.^`|~", min_size=1, max_size=20)
VALUE = st.text(alphabet=st.characters(min_codepoint=0x20, max_codepoint=0x7e), max_size=40)
JSON_LEAF = st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20)
JSON = st.recursive(JSON_LEAF, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(
    st.text(max_size=8), inner, max_size=4), max_leaves=12)
COMPLETION = st.fixed_dictionaries({"model": st.sampled_from(["fake-model", "x"]) | JSON_LEAF},
                                   optional={"prompt": JSON, "messages": JSON, "stream": JSON_LEAF,
                                             "max_tokens": JSON_LEAF})
BODY = (COMPLETION.map(lambda d: json.dumps(d).encode()) | JSON.map(lambda d: json.dumps(d).encode())
        | st.binary(max_size=200))
HOP_AND_FRAMING = {"content-length", "transfer-encoding", "connection", "host", "expect", "upgrade",
                   "content-encoding", "te", "trailer"}


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory) -> Iterator[int]:
    """The gateway's port; the stack runs until the module's tests are done."""
    loop = asyncio.new_event_loop()
    port: Future[int] = Future()
    stop = asyncio.Event()

    async def serve() -> None:
        async with fake_stack(tmp_path_factory.mktemp("fuzz")) as stack:
            port.set_result(stack.gateway.port)
            await stop.wait()

    thread = threading.Thread(target=loop.run_until_complete, args=(serve(),), daemon=True)
    thread.start()
    yield port.result(timeout=10)
    loop.call_soon_threadsafe(stop.set)
    thread.join(10)
    loop.close()  # its self-pipe sockets, else a ResourceWarning in a later test


def exchange(port: int, method: str, target: str, headers: dict[str, str], body: bytes) -> tuple[int, bytes]:
    head = f"{method} {target} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n"
    head += "".join(f"{k}: {v}\r\n" for k, v in headers.items())
    head += f"Content-Length: {len(body)}\r\n\r\n"
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(head.encode() + body)
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    status_line, _, rest = data.partition(b"\r\n")
    assert status_line.startswith(b"HTTP/1."), f"not an HTTP answer: {data[:200]!r}"
    return int(status_line.split()[1]), rest.partition(b"\r\n\r\n")[2]


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(method=st.sampled_from(["POST", "GET", "PUT", "DELETE", "PATCH"]),
       path=st.sampled_from(PATHS), suffix=SUFFIX,
       headers=st.dictionaries(TOKEN.filter(lambda k: k.lower() not in HOP_AND_FRAMING), VALUE, max_size=5),
       content_type=st.sampled_from([None, "application/json", "text/plain", "application/x+json"]),
       body=BODY)
def test_any_request_gets_a_4xx_or_a_correct_answer(live: int, method: str, path: str, suffix: str,
                                                    headers: dict[str, str], content_type: str | None,
                                                    body: bytes) -> None:
    if content_type is not None:
        headers = {**{k: v for k, v in headers.items() if k.lower() != "content-type"}, "Content-Type": content_type}
    target = path + suffix if path.startswith("/") else path
    status, payload = exchange(live, method, target, headers, body)
    assert status < 500, f"{method} {target!r} -> {status}: {payload[:300]!r}"
    if status == 200 and method == "POST" and target.split("?")[0].rstrip("/") in ("/v1/completions",
                                                                                  "/v1/chat/completions"):
        text = payload.decode(errors="replace")
        assert "choices" in text or "data:" in text, text[:300]
    assert exchange(live, "GET", "/healthz", {}, b"")[0] == 200  # still serving
