#!/usr/bin/env python3
"""Load for POST /api/v1/send: TOTAL sends of a 2 KB text over THREADS
keep-alive connections, with the key `bench-token` (a key of
[[api.keys]] whose senders include bench.example).

    scripts/api_load.py ADMIN_PORT TOTAL THREADS
"""
import http.client, json, sys, threading, time
port, total, threads = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
body = json.dumps({"from": "app@bench.example", "to": ["user@example.org"], "subject": "bench",
                   "text": "x" * 2000}).encode()
lat, codes, lock = [], {}, threading.Lock()
def worker(n):
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    for _ in range(n):
        t = time.monotonic()
        c.request("POST", "/api/v1/send", body, {"Authorization": "Bearer bench-token", "Content-Type": "application/json"})
        r = c.getresponse(); r.read()
        with lock:
            lat.append(time.monotonic() - t); codes[r.status] = codes.get(r.status, 0) + 1
start = time.monotonic()
ts = [threading.Thread(target=worker, args=(total // threads,)) for _ in range(threads)]
[t.start() for t in ts]; [t.join() for t in ts]
el = time.monotonic() - start
lat.sort()
print(f"{len(lat)} sends in {el:.2f} s: {len(lat)/el:.0f}/s; p50 {lat[len(lat)//2]*1000:.1f} ms, p99 {lat[int(len(lat)*0.99)]*1000:.1f} ms; {codes}")
