"""A small HTTP proxy that puts a network store's faults in front of a real S3 server on purpose.

Every request waits `latency` seconds; among GETs (reads), every `slow_down`-th is answered 503
SlowDown (S3's throttling) without reaching the server, and every `cut`-th response is cut off
half-way through its body (the connection closes with the Content-Length unmet). Counts of what
it did are in `server.stats`. It runs in threads of the calling process (`start`).
"""

from __future__ import annotations

import http.client
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

SLOW_DOWN = (b'<?xml version="1.0" encoding="UTF-8"?><Error><Code>SlowDown</Code><Message>Please '
             b"reduce your request rate.</Message></Error>")


def start(upstream: int, latency: float = 0.0, slow_down: int = 0, cut: int = 0):
    """A running proxy on a free loopback port: (server, port); `server.shutdown()` stops it."""
    stats = {"requests": 0, "gets": 0, "slow_down": 0, "cut": 0}
    lock = threading.Lock()

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args):  # quiet
            pass

        def _body(self) -> bytes:
            if "chunked" in self.headers.get("Transfer-Encoding", ""):
                out = b""
                while True:
                    line = self.rfile.readline()
                    n = int(line.split(b";")[0], 16)
                    chunk = self.rfile.read(n + 2)
                    out += line + chunk
                    if n == 0:
                        while (t := self.rfile.readline()) not in (b"\r\n", b""):
                            out += t
                        return out + b"\r\n"
            return self.rfile.read(int(self.headers.get("Content-Length", 0) or 0))

        def _any(self):
            body = self._body()
            time.sleep(latency)
            with lock:
                stats["requests"] += 1
                n = stats["gets"] = stats["gets"] + (self.command == "GET")
            if self.command == "GET" and slow_down and n % slow_down == 0:
                with lock:
                    stats["slow_down"] += 1
                self.send_response(503, "Slow Down")
                self.send_header("Content-Type", "application/xml")
                self.send_header("Content-Length", str(len(SLOW_DOWN)))
                self.end_headers()
                self.wfile.write(SLOW_DOWN)
                return
            conn = http.client.HTTPConnection("127.0.0.1", upstream, timeout=60)
            headers = {k: v for k, v in self.headers.items() if k.lower() != "expect"}
            conn.request(self.command, self.path, body=body or None, headers=headers,
                         encode_chunked=False)
            resp = conn.getresponse()
            data = resp.read()
            conn.close()
            cutting = self.command == "GET" and cut and n % cut == 0 and len(data) > 1
            self.send_response(resp.status, resp.reason)
            for k, v in resp.getheaders():
                if k.lower() not in ("transfer-encoding", "connection", "content-length"):
                    self.send_header(k, v)
            # (a HEAD answers the object's size in Content-Length, with no body)
            self.send_header("Content-Length", resp.getheader("Content-Length", "0")
                             if self.command == "HEAD" else str(len(data)))
            if cutting:
                self.send_header("Connection", "close")
            self.end_headers()
            if cutting:
                with lock:
                    stats["cut"] += 1
                self.wfile.write(data[:len(data) // 2])
                self.wfile.flush()
                self.close_connection = True
                return
            if self.command != "HEAD":
                self.wfile.write(data)

        do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _any

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    server.stats = stats
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, server.server_address[1]

