#!/usr/bin/env python3
"""A webhook endpoint for the tests: takes HTTP/1.1 POSTs (keep-alive),
answers each with the status asked for, and appends each request it
answered 2xx to FILE as one JSON line: headers and body as text.
Prints READY once it listens.

usage: webhook_receiver.py --listen 127.0.0.1:PORT --out FILE [--status N]
"""

import argparse
import json
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--listen", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--status", type=int, default=200)
    args = parser.parse_args()
    host, port = args.listen.rsplit(":", 1)
    lock = threading.Lock()

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_POST(self):
            length = int(self.headers.get("Content-Length", "0"))
            body = self.rfile.read(length)
            if 200 <= args.status < 300:
                line = json.dumps(
                    {
                        "path": self.path,
                        "headers": {k.lower(): v for k, v in self.headers.items()},
                        "body": body.decode("utf-8"),
                    }
                )
                with lock, open(args.out, "a", encoding="utf-8") as out:
                    out.write(line + "\n")
            self.send_response(args.status)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *_):
            pass

    server = ThreadingHTTPServer((host, int(port)), Handler)
    server.daemon_threads = True
    print("READY", flush=True)
    server.serve_forever()


if __name__ == "__main__":
    sys.exit(main())
