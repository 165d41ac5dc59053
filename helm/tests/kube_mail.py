#!/usr/bin/env python3
"""Mail through the node pods of the played chart, with one node killed mid-run.

usage: kube_mail.py SINK_DIR KILL_COMMAND NODE_IP...

Sends --count messages (default 300) spread over the node pods, one sender
thread per pod, each message with its own recipient local part
(m<N>@kube.test) so that arrivals can be told apart. When a third of them
are sent, KILL_COMMAND (a shell command) kills the last node pod; its
sender stops at the first failure. Then waits (bounded) until every message
that got a 250 is in SINK_DIR, and fails if one is missing. Messages that
arrive twice are reported: a node killed in the middle of a delivery
leaves that delivery to be tried again (at-least-once, as documented).
Prints "N passed, N failed".
"""
import argparse
import glob
import json
import os
import smtplib
import subprocess
import sys
import threading
import time

parser = argparse.ArgumentParser()
parser.add_argument("sink_dir")
parser.add_argument("kill_command")
parser.add_argument("nodes", nargs="+")
parser.add_argument("--count", type=int, default=300)
parser.add_argument("--wait", type=float, default=90.0, help="seconds to wait for arrivals")
args = parser.parse_args()

accepted = set()
refused = []
lock = threading.Lock()
sent = [0]
kill_at = args.count // 3
killed = threading.Event()


def sender(index, node):
    numbers = range(index, args.count, len(args.nodes))
    smtp = None
    for n in numbers:
        if index == len(args.nodes) - 1 and killed.is_set():
            break
        try:
            if smtp is None:
                smtp = smtplib.SMTP(node, 2525, timeout=20)
            body = f"Subject: kube-test {n}\r\nFrom: app@example.com\r\nTo: m{n}@kube.test\r\n\r\nmessage {n}\r\n"
            smtp.sendmail("app@example.com", [f"m{n}@kube.test"], body)
            with lock:
                accepted.add(n)
                sent[0] += 1
        except (OSError, smtplib.SMTPException) as e:
            with lock:
                refused.append((n, node, repr(e)))
            smtp = None
            if killed.is_set():
                # The killed node's clients lose their connection; the
                # message was not answered with 250, so it is not owed.
                break
            time.sleep(0.2)
    if smtp is not None:
        try:
            smtp.quit()
        except (OSError, smtplib.SMTPException):
            pass


threads = [threading.Thread(target=sender, args=(i, ip)) for i, ip in enumerate(args.nodes)]
for t in threads:
    t.start()
deadline = time.monotonic() + 60
while time.monotonic() < deadline:
    with lock:
        if sent[0] >= kill_at:
            break
    time.sleep(0.01)
print(f"kill after {sent[0]} accepted: {args.kill_command}", flush=True)
subprocess.run(args.kill_command, shell=True, check=True)
killed.set()
for t in threads:
    t.join(timeout=120)

# Refusals from surviving nodes are failures; the killed node's are expected.
victim = args.nodes[-1]
bad_refusals = [r for r in refused if r[1] != victim]
print(f"accepted {len(accepted)} of {args.count}; refused by the killed node: "
      f"{len(refused) - len(bad_refusals)}; refused by the others: {len(bad_refusals)}")
for r in bad_refusals[:10]:
    print("  refused:", r)


def arrivals():
    seen = {}
    for path in glob.glob(os.path.join(args.sink_dir, "*.json")):
        if os.path.basename(path) == "stats.json":
            continue
        with open(path) as f:
            record = json.load(f)
        for rcpt in record["rcpt_tos"]:
            n = int(rcpt.split("@")[0][1:])
            seen[n] = seen.get(n, 0) + 1
    return seen


deadline = time.monotonic() + args.wait
while True:
    seen = arrivals()
    missing = sorted(accepted - set(seen))
    if not missing or time.monotonic() > deadline:
        break
    time.sleep(0.5)

twice = sorted(n for n, c in seen.items() if c > 1)
unexpected = sorted(set(seen) - accepted - {r[0] for r in refused})
print(f"arrived {len(seen)} distinct; missing {len(missing)}; arrived more than once {len(twice)}; "
      f"never sent {len(unexpected)}")
if missing:
    print("  missing:", missing[:20])
if twice:
    print("  more than once (delivery repeated after the kill):", twice[:20])

checks = {
    "a third of the messages were accepted before the kill": sent[0] >= kill_at,
    "no refusal from a surviving node": not bad_refusals,
    "every accepted message arrived": not missing,
    "nothing arrived that was not sent": not unexpected,
}
failed = [name for name, ok in checks.items() if not ok]
for name in failed:
    print("FAILED:", name)
print(f"{len(checks) - len(failed)} passed, {len(failed)} failed")
sys.exit(1 if failed else 0)
