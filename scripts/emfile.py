#!/usr/bin/env python3
"""A running smarthost out of file descriptors: log lines, CPU, recovery.

    scripts/emfile.py --port 2525 --pid PID --log relay.log --seconds 20

Lowers the node's open-file limit (prlimit) to 4 above what it has open,
connects --clients clients so that accept() fails with EMFILE, and waits
--seconds. Prints the log lines and log bytes written meanwhile and the
CPU seconds the node used; then lets the clients go, puts the limit back
and waits (at most 30 s) until a new client gets its 220 greeting.
Every wait is bounded.
"""

import argparse
import os
import resource
import socket
import time


def cpu_seconds(pid):
    fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--pid", type=int, required=True)
    p.add_argument("--log", required=True, help="the node's log file")
    p.add_argument("--clients", type=int, default=30)
    p.add_argument("--seconds", type=float, default=20)
    args = p.parse_args()

    saved = resource.prlimit(args.pid, resource.RLIMIT_NOFILE)
    open_now = len(os.listdir(f"/proc/{args.pid}/fd"))
    resource.prlimit(args.pid, resource.RLIMIT_NOFILE, (open_now + 4, saved[1]))
    log_before = os.path.getsize(args.log)
    lines_before = sum(1 for _ in open(args.log, "rb"))
    cpu_before = cpu_seconds(args.pid)
    clients = [socket.create_connection((args.host, args.port), timeout=5)
               for _ in range(args.clients)]
    time.sleep(args.seconds)
    cpu = cpu_seconds(args.pid) - cpu_before
    lines = sum(1 for _ in open(args.log, "rb")) - lines_before
    written = os.path.getsize(args.log) - log_before
    print(f"EMFILE for {args.seconds:.0f} s with {args.clients} clients waiting: "
          f"{lines} log lines ({written} bytes), {cpu:.2f} s of CPU")

    for c in clients:
        c.close()
    resource.prlimit(args.pid, resource.RLIMIT_NOFILE, saved)
    started = time.monotonic()
    while time.monotonic() - started < 30:
        try:
            with socket.create_connection((args.host, args.port), timeout=5) as probe:
                probe.settimeout(5)
                if probe.recv(4) == b"220 ":
                    print(f"a new client got 220 after {time.monotonic() - started:.2f} s")
                    return
        except OSError:
            pass
        time.sleep(0.2)
    raise SystemExit("no greeting within 30 s")


main()
