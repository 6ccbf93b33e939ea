#!/usr/bin/env python3
"""The limit of this stack, for the heartbeat benchmark: a bare http.server ThreadingHTTPServer that does
the least a heartbeat endpoint can do. POST /api/agents/{id}/heartbeat parses the JSON body, updates a dict
under a lock and answers a small JSON object. It serves HTTP the way clawbridge.py does: HTTP/1.1
keep-alive, TCP_NODELAY, daemon threads, the same listen backlog, and each response written in one send
with the same headers (Server, Date, Content-Type, Content-Length, Connection: close when closing). No
routing, validation, domain, storage or logging: what the bridge adds over this is what it costs.

    python3 tests/bench/limit_server.py --serve [--host 127.0.0.1] [--port 0]

prints "Limit server running on http://HOST:PORT" and serves until SIGTERM. Without --serve it does
nothing (make bench runs every file in tests/bench/)."""
import argparse
import email.utils
import json
import signal
import socket
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

BEATS = {}
LOCK = threading.Lock()


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "limit/1"
    sys_version = ""
    timeout = 30.0

    def setup(self):
        super().setup()
        self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def do_POST(self):
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length) if length else b""
        body = json.loads(raw.decode("utf-8")) if raw.strip() else {}
        parts = self.path.split("?")[0].strip("/").split("/")
        agent_id = parts[2] if len(parts) == 4 and parts[:2] == ["api", "agents"] else ""
        now = int(time.time() * 1000)
        with LOCK:
            BEATS[agent_id] = (now, body)
        self.send_json(200, {"success": True, "agent": agent_id, "serverTime": now})

    do_GET = do_PUT = do_POST

    def send_json(self, status, body):
        payload = json.dumps(body, separators=(",", ":"), ensure_ascii=False).encode()
        lines = [f"HTTP/1.1 {status} OK", f"Server: {self.server_version}",
                 f"Date: {email.utils.formatdate(usegmt=True)}",
                 "Content-Type: application/json; charset=utf-8", f"Content-Length: {len(payload)}"]
        if self.close_connection:
            lines.append("Connection: close")
        self.wfile.write(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + payload)

    def log_message(self, format, *args):
        pass


class Server(ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False
    allow_reuse_address = True
    request_queue_size = 1024       # clawbridge's REQUEST_QUEUE_SIZE


def main(argv=None):
    parser = argparse.ArgumentParser(description="the limit server of the heartbeat benchmark")
    parser.add_argument("--serve", action="store_true", help="serve (without it, do nothing)")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    args = parser.parse_args(argv)
    if not args.serve:
        print("limit_server.py is started by the heartbeat benchmark (python3 tests/bench/run.py); "
              "--serve to run it by hand")
        return 0
    server = Server((args.host, args.port), Handler)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    threading.Thread(target=server.serve_forever, daemon=True).start()
    host, port = server.server_address[:2]
    print(f"Limit server running on http://{host}:{port}", flush=True)
    while not stop.wait(0.5):
        pass
    server.shutdown()
    server.server_close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
