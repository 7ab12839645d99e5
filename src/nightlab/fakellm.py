"""A loopback fake of the OpenAI and Anthropic HTTP protocols, shipped as a test double.

:class:`FakeLLMServer` listens on 127.0.0.1 (a free port), speaks the real wire protocols
(``POST /v1/chat/completions`` and ``POST /v1/messages``, JSON with ``usage``), and answers
from a script: each request takes the next :class:`Turn`; the last one repeats. Requests are
recorded (``.requests``: parsed JSON bodies plus headers) for assertions. Used by the test suite
with the real ``openai`` and ``anthropic`` clients; useful for trying a lab without a model::

Shapes a test can script (the ones local model servers show):

- ``structured=False``: a request with ``response_format`` is refused with HTTP 400 (as servers
  without JSON-schema support answer), without consuming a turn; ``structured="json_object"``:
  only llama-cpp-python's ``{"type": "json_object", "schema": ...}`` is taken, ``json_schema`` gets
  the HTTP 500 validation error that server answers;
- ``stream: true`` (OpenAI protocol): the text is sent as server-sent events, a few characters per
  chunk (``Turn.chunk_delay_s`` apart), usage in the last chunk when ``stream_options.include_usage``;
  a client that closes the stream early is counted in ``.disconnects`` (llama.cpp stops there);
- ``Turn.delay_s``: the answer starts that late (timeouts, interruption);
- ``tokenize=True``: llama.cpp's ``POST /tokenize`` and llama-cpp-python's ``POST /extras/tokenize``,
  one token per 3 characters (so a test can tell it from the chars/4 estimate);
- ``Turn.timings``: a llama.cpp ``timings`` object (``cache_n``: prompt tokens from its cache).

    with FakeLLMServer("openai", [Turn(text="...")]) as srv:
        ...  # base_url = srv.base_url
"""

from __future__ import annotations

import json
import math
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Literal


@dataclass(frozen=True)
class Turn:
    text: str = ""
    status: int = 200  # anything else answers with an error body of that status
    tokens_in: int = 100
    tokens_out: int = 20
    tokens_cached: int = 0
    headers: dict[str, str] = field(default_factory=dict)  # e.g. {"retry-after-ms": "10"}
    error: str = "scripted error"
    delay_s: float = 0.0  # wait this long before answering
    chunk_delay_s: float = 0.0  # streaming: wait this long between chunks
    timings: dict[str, Any] | None = None  # llama.cpp's extra "timings" object


class FakeLLMServer:
    def __init__(self, protocol: Literal["openai", "anthropic"], script: list[Turn], *,
                 structured: bool | Literal["json_object"] = True, tokenize: bool = False) -> None:
        self.protocol = protocol
        self.script = list(script)
        self.structured = structured
        self.tokenize = tokenize
        self.requests: list[dict[str, Any]] = []
        self.refused: list[dict[str, Any]] = []  # requests refused for their response_format
        self.tokenized: list[str] = []
        self.disconnects = 0
        self._lock = threading.Lock()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def port(self) -> int:
        return int(self._server.server_address[1])

    @property
    def base_url(self) -> str:
        """What the SDK's ``base_url`` should be (OpenAI clients append /chat/completions)."""
        root = f"http://127.0.0.1:{self.port}"
        return root + "/v1" if self.protocol == "openai" else root

    def __enter__(self) -> FakeLLMServer:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()

    def _next(self, body: dict[str, Any], headers: dict[str, str]) -> Turn:
        with self._lock:
            self.requests.append({"body": body, "headers": headers})
            return self.script.pop(0) if len(self.script) > 1 else self.script[0]

    def _payload(self, turn: Turn, body: dict[str, Any]) -> dict[str, Any]:
        if turn.status != 200:
            if self.protocol == "openai":
                return {"error": {"message": turn.error, "type": "scripted", "code": turn.status}}
            return {"type": "error", "error": {"type": "scripted_error", "message": turn.error}}
        model = body.get("model", "fake")
        if self.protocol == "openai":
            extra = {"timings": turn.timings} if turn.timings is not None else {}
            return {**extra,
                "id": "chatcmpl-fake", "object": "chat.completion", "created": 0, "model": model,
                "choices": [{"index": 0, "finish_reason": "stop",
                             "message": {"role": "assistant", "content": turn.text}}],
                "usage": {"prompt_tokens": turn.tokens_in, "completion_tokens": turn.tokens_out,
                          "total_tokens": turn.tokens_in + turn.tokens_out,
                          "prompt_tokens_details": {"cached_tokens": turn.tokens_cached}},
            }
        return {
            "id": "msg_fake", "type": "message", "role": "assistant", "model": model,
            "content": [{"type": "text", "text": turn.text}],
            "stop_reason": "end_turn", "stop_sequence": None,
            "usage": {"input_tokens": turn.tokens_in - turn.tokens_cached, "output_tokens": turn.tokens_out,
                      "cache_read_input_tokens": turn.tokens_cached, "cache_creation_input_tokens": 0},
        }

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        fake = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: Any) -> None:  # quiet
                pass

            def do_POST(self) -> None:
                n = int(self.headers.get("content-length") or 0)
                raw = self.rfile.read(n) if n else b"{}"
                try:
                    body = json.loads(raw)
                except json.JSONDecodeError:
                    body = {}
                route = self.path.split("?")[0]
                if fake.tokenize and route in ("/tokenize", "/extras/tokenize"):
                    text = str(body.get("content", body.get("input", "")))
                    with fake._lock:
                        fake.tokenized.append(text)
                    self._send(200, {"tokens": list(range(math.ceil(len(text) / 3)))}, {})
                    return
                expected = "/v1/chat/completions" if fake.protocol == "openai" else "/v1/messages"
                if route != expected:
                    self._send(404, {"error": {"message": f"no route {self.path}"}}, {})
                    return
                form = (body.get("response_format") or {}).get("type") if "response_format" in body else None
                if form is not None and (fake.structured is False or
                                         (fake.structured == "json_object" and form != "json_object")):
                    with fake._lock:
                        fake.refused.append(body)
                    if fake.structured is False:
                        self._send(400, {"error": {"message": "Unrecognized request argument supplied: "
                                                              "response_format", "type": "invalid_request_error",
                                                   "code": 400}}, {})
                    else:
                        self._send(500, {"error": {"message": "1 validation error: ('body', 'response_format', "
                                                              "'type'): Input should be 'text' or 'json_object'",
                                                   "type": "internal_server_error"}}, {})
                    return
                turn = fake._next(body, {k.lower(): v for k, v in self.headers.items()})
                if turn.delay_s:
                    time.sleep(turn.delay_s)
                if turn.status == 200 and body.get("stream") and fake.protocol == "openai":
                    self._stream(turn, body)
                    return
                self._send(turn.status, fake._payload(turn, body), turn.headers)

            def _stream(self, turn: Turn, body: dict[str, Any]) -> None:
                self.close_connection = True
                self.send_response(200)
                self.send_header("content-type", "text/event-stream")
                self.send_header("connection", "close")
                self.end_headers()
                full = fake._payload(turn, body)
                base = {"id": "chatcmpl-fake", "object": "chat.completion.chunk", "created": 0,
                        "model": full["model"]}
                pieces = [turn.text[i:i + 4] for i in range(0, len(turn.text), 4)] or [""]
                try:
                    for k, piece in enumerate(pieces):
                        delta: dict[str, Any] = {"content": piece}
                        if k == 0:
                            delta["role"] = "assistant"
                        chunk = {**base, "choices": [{"index": 0, "delta": delta, "finish_reason": None}]}
                        self.wfile.write(f"data: {json.dumps(chunk)}\n\n".encode())
                        self.wfile.flush()
                        if turn.chunk_delay_s:
                            time.sleep(turn.chunk_delay_s)
                    end = {**base, "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]}
                    if "timings" in full:
                        end["timings"] = full["timings"]
                    self.wfile.write(f"data: {json.dumps(end)}\n\n".encode())
                    if (body.get("stream_options") or {}).get("include_usage"):
                        usage = {**base, "choices": [], "usage": full["usage"]}
                        self.wfile.write(f"data: {json.dumps(usage)}\n\n".encode())
                    self.wfile.write(b"data: [DONE]\n\n")
                    self.wfile.flush()
                except (BrokenPipeError, ConnectionResetError):
                    with fake._lock:
                        fake.disconnects += 1

            def _send(self, status: int, payload: dict[str, Any], headers: dict[str, str]) -> None:
                data = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(data)))
                for k, v in headers.items():
                    self.send_header(k, v)
                self.end_headers()
                self.wfile.write(data)

        return Handler
