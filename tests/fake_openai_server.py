"""A tiny scripted OpenAI-compatible server for tests (stdlib http.server, one thread per request).

Each POST to ``.../chat/completions`` consumes the next script step:

* ``"text"``: 200 with that string as ``choices[0].message.content``;
* ``Reply(status=500)``: that HTTP status with an OpenAI-style error body;
* ``Reply(sleep=2.0, content="...")``: sleep first (longer than the client timeout -> client retries);
* ``Reply(drip=0.05)``: the answer trickles out one byte every `drip` seconds (the body, or with
  ``drip_headers=True`` the whole response from the status line on): each read is quick, the whole is slow;
* ``Reply(stream_bytes=N)``: N filler bytes in 64 KiB writes, close-delimited (no Content-Length; with
  ``declare_length=True`` the header announces N);
* ``Reply(truncate_to=n)``: announces the full answer's length but sends only its first n bytes, then closes;
* ``Reply(hangup=True)``: reads the request and closes the connection without any answer;
* a callable ``f(request_body) -> str | Reply``;
* ``redirect(url, status=302)``: that redirect status with ``Location: url`` (e.g. another server's
  ``.../chat/completions``, to check where the API key goes).

GET requests (what a client makes of a 301/302/303 after a POST) are recorded and answered like POSTs,
so a client that follows a redirect to this server gets its answer.

``requests`` records every request and ``sent`` the bytes the server managed to write for each.

When the script is exhausted ``default`` (same kinds) answers; with no default, a 500.
"""

from __future__ import annotations

import json
import threading
import time
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


@dataclass
class Reply:
    content: str | None = None
    status: int = 200
    sleep: float = 0.0
    headers: dict | None = None
    raw_body: bytes | None = None  # sent verbatim instead of a chat completion
    drip: float = 0.0
    drip_headers: bool = False
    stream_bytes: int | None = None
    declare_length: bool = False
    truncate_to: int | None = None
    hangup: bool = False


def redirect(url: str, status: int = 302) -> Reply:
    """A script step answering `status` with `Location: url`."""
    return Reply(status=status, headers={"Location": url})


class ScriptedOpenAIServer:
    def __init__(self, script: list[Any] | None = None, default: Any = None, model: str = "scripted-model"):
        self.script = list(script or [])
        self.default = default
        self.model = model
        self.requests: list[dict] = []  # {"path", "headers", "body", "step", "method"}
        self.sent: list[int] = []  # bytes written per request (body and headers)
        self._lock = threading.Lock()
        self._httpd: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # -- lifecycle ---------------------------------------------------------------
    def start(self) -> "ScriptedOpenAIServer":
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):  # keep test output quiet
                pass

            def do_POST(self):
                length = int(self.headers.get("Content-Length") or 0)
                raw = self.rfile.read(length) if length else b""
                try:
                    body = json.loads(raw.decode("utf-8") or "{}")
                except json.JSONDecodeError:
                    body = {"_unparsable": raw.decode("utf-8", "replace")}
                if not self.path.rstrip("/").endswith("/chat/completions"):
                    return self._send(404, {"error": {"message": f"no route {self.path}"}})
                with server._lock:
                    step = server.script.pop(0) if server.script else server.default
                    server.requests.append({"path": self.path, "headers": dict(self.headers),
                                            "body": body, "step": step})
                    self.index = len(server.sent)
                    server.sent.append(0)
                    server.requests[-1]["method"] = self.command
                if callable(step) and not isinstance(step, Reply):
                    step = step(body)
                if step is None:
                    return self._send(500, {"error": {"message": "script exhausted"}})
                if isinstance(step, str):
                    step = Reply(content=step)
                if step.sleep:
                    time.sleep(step.sleep)
                if step.hangup:
                    self.close_connection = True
                    return None
                if step.stream_bytes is not None:
                    return self._stream(step)
                if step.raw_body is not None:
                    return self._send_bytes(step.status, step.raw_body, step.headers)
                if step.status != 200:
                    return self._send(step.status, {"error": {"message": f"scripted status {step.status}"}},
                                      step.headers)
                payload = {
                    "id": "chatcmpl-test", "object": "chat.completion", "created": int(time.time()),
                    "model": body.get("model", server.model),
                    "choices": [{"index": 0, "finish_reason": "stop",
                                 "message": {"role": "assistant", "content": step.content}}],
                    "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
                }
                data = json.dumps(payload).encode("utf-8")
                if step.drip or step.truncate_to is not None:
                    return self._send_raw(step, self._head(200, len(data), step.headers) + data)
                self._send_bytes(200, data, step.headers)

            do_GET = do_POST

            def _send(self, status, obj, headers=None):
                self._send_bytes(status, json.dumps(obj).encode("utf-8"), headers)

            def _head(self, status, length, headers=None) -> bytes:
                lines = [f"HTTP/1.1 {status} {self.responses[status][0]}", "Content-Type: application/json"]
                lines += [] if length is None else [f"Content-Length: {length}"]
                lines += [f"{k}: {v}" for k, v in (headers or {}).items()] + ["Connection: close", "", ""]
                return "\r\n".join(lines).encode("ascii")

            def _write(self, data: bytes) -> None:
                self.wfile.write(data)
                self.wfile.flush()
                with server._lock:
                    server.sent[self.index] += len(data)

            def _send_raw(self, step, response: bytes) -> None:
                """Write a prepared response: dripped byte by byte, or cut after `truncate_to` body bytes."""
                self.close_connection = True
                body_start = response.index(b"\r\n\r\n") + 4
                if step.truncate_to is not None:
                    response = response[:body_start + step.truncate_to]
                try:
                    if step.drip and not step.drip_headers:
                        self._write(response[:body_start])
                        response = response[body_start:]
                    if not step.drip:
                        return self._write(response)
                    for i in range(len(response)):
                        self._write(response[i:i + 1])
                        time.sleep(step.drip)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client gave up

            def _stream(self, step) -> None:
                self.close_connection = True
                filler = b"x" * 65536
                try:
                    self._write(self._head(200, step.stream_bytes if step.declare_length else None, step.headers))
                    left = step.stream_bytes
                    while left > 0:
                        self._write(filler[:left])
                        left -= len(filler)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client stopped reading

            def _send_bytes(self, status, data, headers=None):
                try:
                    self.send_response(status)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(data)))
                    for k, v in (headers or {}).items():
                        self.send_header(k, str(v))
                    self.end_headers()
                    self.wfile.write(data)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client gave up (timeout test)

        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._httpd.daemon_threads = True
        self._thread = threading.Thread(target=self._httpd.serve_forever, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
            self._httpd = None

    def __enter__(self) -> "ScriptedOpenAIServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    @property
    def port(self) -> int:
        assert self._httpd is not None, "server not started"
        return self._httpd.server_address[1]

    @property
    def url(self) -> str:
        """Base URL, OpenAI style (ends in /v1)."""
        return f"http://127.0.0.1:{self.port}/v1"

    def messages(self, i: int) -> list[dict]:
        return self.requests[i]["body"]["messages"]
