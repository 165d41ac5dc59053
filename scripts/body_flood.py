#!/usr/bin/env python3
"""Many concurrent large messages against one smarthost, with its RSS.

    scripts/body_flood.py --port 2525 --pid PID --clients 200 --size 10000000

Opens CLIENTS connections, takes each through EHLO, MAIL, RCPT and DATA,
then sends every body at the same time in 64 KiB pieces and reads the
replies. Meanwhile it samples the server's resident memory (VmRSS) every
50 ms. Prints the replies by code and the RSS before, once every client is in DATA (before
any body byte), at peak and after; the bodies' share is peak minus in DATA.
Every wait is bounded (--timeout seconds per reply).
"""

import argparse
import asyncio
import collections
import time


def rss(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


async def reply(reader, timeout):
    lines = []
    while True:
        line = await asyncio.wait_for(reader.readline(), timeout)
        if not line:
            raise ConnectionError("closed")
        lines.append(line.decode(errors="replace").rstrip())
        if len(line) < 4 or line[3:4] != b"-":
            return lines[-1]


async def client(i, args, start, results):
    try:
        reader, writer = await asyncio.wait_for(
            asyncio.open_connection(args.host, args.port), args.timeout)
        await reply(reader, args.timeout)
        for cmd in (b"EHLO flood.example", f"MAIL FROM:<c{i}@example.com>{args.mail_params}".encode(),
                    b"RCPT TO:<user@example.org>", b"DATA"):
            writer.write(cmd + b"\r\n")
            r = await reply(reader, args.timeout)
            if cmd == b"DATA" and not r.startswith("354"):
                results[r[:9]] += 1
                writer.close()
                return
        await start.wait()
        line = b"x" * 998 + b"\r\n"
        piece = line * 64
        sent = 0
        while sent + len(piece) <= args.size:
            writer.write(piece)
            await writer.drain()
            sent += len(piece)
        writer.write(b".\r\n")
        r = await reply(reader, args.timeout)
        results[r[:9]] += 1
        writer.write(b"QUIT\r\n")
        await writer.drain()
        writer.close()
    except Exception as e:  # counted, not raised: one bad client is a result
        results[f"error {type(e).__name__}"] += 1


async def main():
    p = argparse.ArgumentParser()
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--pid", type=int, required=True)
    p.add_argument("--clients", type=int, default=200)
    p.add_argument("--size", type=int, default=10_000_000)
    p.add_argument("--timeout", type=float, default=300)
    p.add_argument("--declare-size", action="store_true",
                   help="send SIZE= with MAIL FROM")
    args = p.parse_args()
    args.mail_params = f" SIZE={args.size}" if args.declare_size else ""
    before = rss(args.pid)
    peak = [before]
    done = asyncio.Event()

    async def sample():
        while not done.is_set():
            peak[0] = max(peak[0], rss(args.pid))
            await asyncio.sleep(0.05)

    sampler = asyncio.create_task(sample())
    start = asyncio.Event()
    results = collections.Counter()
    tasks = [asyncio.create_task(client(i, args, start, results)) for i in range(args.clients)]
    # Give every client time to reach DATA (or its refusal) first.
    await asyncio.sleep(max(1.0, args.clients / 200))
    # What the sessions cost before any body byte: the bodies' share of
    # the peak is what comes on top.
    at_data = rss(args.pid)
    peak[0] = at_data
    t0 = time.monotonic()
    start.set()
    await asyncio.gather(*tasks)
    elapsed = time.monotonic() - t0
    done.set()
    await sampler
    after = rss(args.pid)
    mb = 1 << 20
    print(f"clients={args.clients} size={args.size} declared={args.declare_size} "
          f"seconds={elapsed:.1f}")
    for code, n in sorted(results.items()):
        print(f"  {n:5d} x {code}")
    print(f"RSS before={before // mb} MB in DATA={at_data // mb} MB peak={peak[0] // mb} MB "
          f"after={after // mb} MB; bodies: {(peak[0] - at_data) // mb} MB")


asyncio.run(main())
