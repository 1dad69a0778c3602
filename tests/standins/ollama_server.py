"""A stand-in Ollama server: the HTTP API the `ollama` adapter speaks, with Ollama's streaming format.

GET /api/version -> {"version"}; GET /api/tags -> {"models": [{"name", ...}]}; POST /api/generate and
/api/chat with "stream": true -> NDJSON fragments (`response`, or `message.content` for chat) and a final
`done` line with prompt_eval_count and eval_count (https://docs.ollama.com/api/streaming). An unknown
model is HTTP 404 {"error": "model '...' not found"}. Prompt markers (tests/standins/README.md) choose
malformed lines, a hang, huge output or an error inside the stream.
"""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

MODELS = ["llama3.2:1b", "qwen2.5-coder:7b"]
VERSION = "0.12.3"


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:
        return

    def _json(self, status: int, body: dict[str, Any]) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self) -> None:
        if self.path == "/api/version":
            self._json(200, {"version": VERSION})
        elif self.path == "/api/tags":
            self._json(200, {"models": [{"name": name, "model": name, "size": 1} for name in MODELS]})
        else:
            self._json(404, {"error": "not found"})

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", "0"))) or b"{}")
        chat = self.path == "/api/chat"
        if self.path not in ("/api/generate", "/api/chat"):
            self._json(404, {"error": "not found"})
            return
        if body.get("model") not in MODELS:
            self._json(404, {"error": f"model '{body.get('model')}' not found, try pulling it first"})
            return
        prompt = body["messages"][-1]["content"] if chat else body.get("prompt", "")
        self.send_response(200)
        self.send_header("Content-Type", "application/x-ndjson")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()

        def line(event: dict[str, Any] | str) -> None:
            data = (event if isinstance(event, str) else json.dumps(event)).encode() + b"\n"
            self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
            self.wfile.flush()

        def fragment(text: str) -> dict[str, Any]:
            event: dict[str, Any] = {"model": body["model"], "created_at": "2025-10-26T17:15:24.097767Z", "done": False}
            if chat:
                event["message"] = {"role": "assistant", "content": text}
            else:
                event["response"] = text
            return event

        try:
            if "standin:malformed" in prompt:
                line("not json at all")
                line(fragment("half"))
            elif "standin:hang" in prompt:
                line(fragment("thinking"))
                time.sleep(3600)
            elif "standin:fail" in prompt:
                line(fragment("partial"))
                line({"error": "an error was encountered while running the model: out of memory"})
            else:
                count = 2000 if "standin:huge" in prompt else 3
                words = ["That", "'s", " a", " fine", " question", "!"]
                for index in range(count):
                    line(fragment(words[index % len(words)] * (5000 if count > 3 else 1)))
                done: dict[str, Any] = fragment("")
                done.update(
                    done=True, done_reason="stop", total_duration=4353619900, load_duration=63915300,
                    prompt_eval_count=26, prompt_eval_duration=246847000, eval_count=count,
                    eval_duration=4032296000,
                )  # fmt: skip
                line(done)
            self.wfile.write(b"0\r\n\r\n")
            self.wfile.flush()
        except (BrokenPipeError, ConnectionResetError):
            pass


class OllamaStandIn:
    """The stand-in server on a free port of 127.0.0.1, in a background thread."""

    def __init__(self) -> None:
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        host, port = self.server.server_address[:2]
        return f"http://{host!s}:{port}"

    def __enter__(self) -> OllamaStandIn:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()
