"""A webhook receiver for tests: a real HTTP server process on 127.0.0.1.

    python -m tests.notify.receiver LOG [--hang-first N] [--fail-first N] [--status CODE]

Prints its port on the first line of stdout, then appends one JSON line per request to
LOG: path, event id, signature header, body, the attempt's number for that event id and
path, and the status answered (0: it hung past the client's timeout). The first
`--hang-first` attempts of each event sleep `--hang-seconds` and answer nothing useful;
the next `--fail-first` answer 500; the rest answer `--status`.
"""

from __future__ import annotations

import argparse
import json
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("log", type=Path)
    parser.add_argument("--hang-first", type=int, default=0)
    parser.add_argument("--hang-seconds", type=float, default=3.0)
    parser.add_argument("--fail-first", type=int, default=0)
    parser.add_argument("--status", type=int, default=200)
    args = parser.parse_args()
    attempts: Counter[tuple[str, str]] = Counter()
    lock = threading.Lock()

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
            event_id = self.headers.get("Callcredit-Event-Id", "")
            with lock:
                attempts[(self.path, event_id)] += 1
                attempt = attempts[(self.path, event_id)]
            status = args.status
            if attempt <= args.hang_first:
                time.sleep(args.hang_seconds)
                status = 0
            elif attempt <= args.hang_first + args.fail_first:
                status = 500
            record = {
                "path": self.path,
                "event_id": event_id,
                "signature": self.headers.get("Callcredit-Signature", ""),
                "body": body.decode(),
                "attempt": attempt,
                "status": status,
            }
            with lock, args.log.open("a") as out:
                out.write(json.dumps(record) + "\n")
            try:
                self.send_response(status or 200)
                self.send_header("Content-Length", "0")
                self.end_headers()
            except OSError:
                pass  # the client gave up (its timeout)

        def log_message(self, format: str, *values: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    print(server.server_address[1], flush=True)
    server.serve_forever()


if __name__ == "__main__":
    main()
