#!/usr/bin/env python3
"""A fake OpenAI/Anthropic-compatible upstream for Portcullis demos and tests.

POST /v1/chat/completions   OpenAI chat completions: JSON, or SSE when "stream": true
                            (the final chunk carries usage, as with stream_options.include_usage).
POST /v1/messages           Anthropic messages: JSON, or SSE (message_start / message_delta usage).
GET  /_fake/requests        what this server received (method, path, headers), for tests.
DELETE /_fake/requests      forget them.

Usage numbers: request header `x-fake-usage: PROMPT,COMPLETION` (default 12,30).
`x-fake-delay-ms: N` delays the answer (for concurrency tests).
`x-fake-no-usage: 1` leaves usage out (a stream without stream_options.include_usage).
`x-fake-sse-padding: N` adds, before the usage chunk of an OpenAI stream, one event of about
N bytes of `data:` lines with no blank line between them (for metering memory bounds).
`x-fake-hold: before` holds the answer until POST /_fake/release; `x-fake-hold: after-first`
sends the headers and the first chunk of a stream, then holds the rest (a long stream).
GET /_fake/held says how many answers are held now. `x-fake-cut-after: N` closes the
connection after N events of a stream (a response cut mid-body); `x-fake-error-after: N`
ends an Anthropic stream after N events with an `error` event (as an overloaded provider does).
`x-fake-json-padding: N` makes a JSON answer's content N bytes longer (a body larger than
any buffer).
Prints `listening on PORT` once ready. Standard library only.
"""
import argparse
import json
import socket
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

RECEIVED = []
LOCK = threading.Lock()
# Held answers wait for the release generation to move past the one they started in.
HOLD = threading.Condition()
HELD = 0
RELEASES = 0


def hold():
    global HELD
    with HOLD:
        start = RELEASES
        HELD += 1
        HOLD.notify_all()
        HOLD.wait_for(lambda: RELEASES > start)
        HELD -= 1


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "fake-llm/1"

    def log_message(self, fmt, *args):  # quiet
        pass

    def _send(self, status, body, content_type="application/json"):
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        self.send_response(status)
        self.send_header("content-type", content_type)
        self.send_header("content-length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _read_body(self):
        n = int(self.headers.get("content-length") or 0)
        raw = self.rfile.read(n) if n else b""
        try:
            return json.loads(raw) if raw else {}
        except ValueError:
            return {}

    def _record(self):
        with LOCK:
            RECEIVED.append({
                "method": self.command,
                "path": self.path,
                "headers": {k.lower(): v for k, v in self.headers.items()},
            })

    def _usage(self):
        raw = self.headers.get("x-fake-usage", "12,30")
        try:
            p, c = (int(x) for x in raw.split(","))
        except ValueError:
            p, c = 12, 30
        return p, c

    def do_GET(self):
        if self.path == "/_fake/requests":
            with LOCK:
                return self._send(200, list(RECEIVED))
        if self.path == "/_fake/held":
            with HOLD:
                return self._send(200, {"held": HELD})
        self._record()
        self._send(200, {"object": "list", "data": [{"id": "fake-model", "object": "model"}]})

    def do_DELETE(self):
        if self.path == "/_fake/requests":
            with LOCK:
                RECEIVED.clear()
            return self._send(200, {})
        self._send(404, {"error": {"message": "not found"}})

    def do_POST(self):
        global RELEASES
        body = self._read_body()
        if self.path == "/_fake/release":
            with HOLD:
                RELEASES += 1
                HOLD.notify_all()
            return self._send(200, {})
        self._record()
        if self.headers.get("x-fake-hold") == "before":
            hold()
        delay = self.headers.get("x-fake-delay-ms")
        if delay:
            time.sleep(int(delay) / 1000)
        model = body.get("model", "fake-model")
        prompt, completion = self._usage()
        path = self.path.split("?", 1)[0]
        if path == "/v1/chat/completions":
            return self._openai(body, model, prompt, completion)
        if path == "/v1/messages":
            return self._anthropic(body, model, prompt, completion)
        self._send(404, {"error": {"message": f"no route {path}", "type": "invalid_request_error"}})

    def _sse(self, events):
        self.send_response(200)
        self.send_header("content-type", "text/event-stream")
        self.send_header("cache-control", "no-cache")
        self.send_header("transfer-encoding", "chunked")
        self.end_headers()
        cut = self.headers.get("x-fake-cut-after")
        for i, event in enumerate(events):
            if i == 1 and self.headers.get("x-fake-hold") == "after-first":
                hold()
            if cut is not None and i == int(cut):
                self.close_connection = True
                try:
                    self.connection.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
                return
            data = event.encode()
            self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
            self.wfile.flush()
        self.wfile.write(b"0\r\n\r\n")

    def _openai(self, body, model, prompt, completion):
        usage = {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}
        if self.headers.get("x-fake-no-usage"):
            usage = None
        if not body.get("stream"):
            content = "Hello from the fake upstream." + "x" * int(self.headers.get("x-fake-json-padding") or 0)
            return self._send(200, {
                "id": "chatcmpl-fake", "object": "chat.completion", "model": model,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": content},
                             "finish_reason": "stop"}],
                "usage": usage,
            })
        chunks = []
        for word in ["Hello", " from", " the", " fake", " upstream."]:
            chunks.append({"id": "chatcmpl-fake", "object": "chat.completion.chunk", "model": model,
                           "choices": [{"index": 0, "delta": {"content": word}, "finish_reason": None}]})
        chunks.append({"id": "chatcmpl-fake", "object": "chat.completion.chunk", "model": model,
                       "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]})
        if usage is not None:
            chunks.append({"id": "chatcmpl-fake", "object": "chat.completion.chunk", "model": model,
                           "choices": [], "usage": usage})
        events = [f"data: {json.dumps(c)}\n\n" for c in chunks]
        padding = int(self.headers.get("x-fake-sse-padding") or 0)
        if padding:
            line = "data: " + "x" * 65529 + "\n"
            events[-1:-1] = [line] * (padding // len(line) + 1) + ["\n"]
        self._sse(events + ["data: [DONE]\n\n"])

    def _anthropic(self, body, model, prompt, completion):
        if not body.get("stream"):
            return self._send(200, {
                "id": "msg_fake", "type": "message", "role": "assistant", "model": model,
                "content": [{"type": "text", "text": "Hello from the fake upstream."}],
                "stop_reason": "end_turn",
                "usage": {"input_tokens": prompt, "output_tokens": completion},
            })
        events = [
            ("message_start", {"type": "message_start", "message": {
                "id": "msg_fake", "type": "message", "role": "assistant", "model": model, "content": [],
                "usage": {"input_tokens": prompt, "output_tokens": 1}}}),
            ("content_block_start", {"type": "content_block_start", "index": 0,
                                     "content_block": {"type": "text", "text": ""}}),
            ("content_block_delta", {"type": "content_block_delta", "index": 0,
                                     "delta": {"type": "text_delta", "text": "Hello from the fake upstream."}}),
            ("content_block_stop", {"type": "content_block_stop", "index": 0}),
            ("message_delta", {"type": "message_delta", "delta": {"stop_reason": "end_turn"},
                               "usage": {"output_tokens": completion}}),
            ("message_stop", {"type": "message_stop"}),
        ]
        error_after = self.headers.get("x-fake-error-after")
        if error_after is not None:
            events = events[:int(error_after)] + [("error", {"type": "error", "error": {
                "type": "overloaded_error", "message": "Overloaded"}})]
        self._sse([f"event: {name}\ndata: {json.dumps(data)}\n\n" for name, data in events])


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=8081, help="0 picks a free port")
    args = ap.parse_args()
    server = ThreadingHTTPServer((args.host, args.port), Handler)
    server.daemon_threads = True
    print(f"listening on {server.server_address[1]}", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    sys.exit(main())
