#!/usr/bin/env python3
"""A local HTTP sink standing in for a social network: every POST body is appended,
one JSON line per post, to FILE; GET returns them all as a JSON array.

usage: sink.py PORT FILE   (listens on 127.0.0.1 only)
"""
import json
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

LOCK = threading.Lock()


class Sink(BaseHTTPRequestHandler):
    def do_POST(self):
        length = int(self.headers.get("Content-Length") or 0)
        if length > 65536:
            return self.answer(413, {"error": "body over 64 KiB"})
        raw = self.rfile.read(length)
        try:
            body = json.loads(raw or b"{}")
        except ValueError:
            return self.answer(400, {"error": "not JSON"})
        with LOCK:
            with open(FILE, "a", encoding="utf-8") as f:
                f.write(json.dumps({"path": self.path, "body": body}) + "\n")
            count = sum(1 for _ in open(FILE, encoding="utf-8"))
        self.answer(201, {"ok": True, "id": count})

    def do_GET(self):
        with LOCK:
            try:
                with open(FILE, encoding="utf-8") as f:
                    posts = [json.loads(line) for line in f if line.strip()]
            except FileNotFoundError:
                posts = []
        self.answer(200, posts)

    def answer(self, status, value):
        data = json.dumps(value).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit("usage: sink.py PORT FILE")
    FILE = sys.argv[2]
    server = ThreadingHTTPServer(("127.0.0.1", int(sys.argv[1])), Sink)
    print(f"sink: listening on 127.0.0.1:{sys.argv[1]}, writing {FILE}", file=sys.stderr)
    server.serve_forever()
