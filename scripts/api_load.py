#!/usr/bin/env python3
"""Load for POST /api/v1/send: TOTAL sends of a 2 KB text over THREADS
keep-alive connections, with the key `bench-token` (a key of
[[api.keys]] whose senders include bench.example). With `idempotent`,
each send carries an Idempotency-Key of its own.

    scripts/api_load.py ADMIN_PORT TOTAL THREADS [idempotent]
"""
import http.client, json, sys, threading, time
port, total, threads = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
idempotent = sys.argv[4:] == ["idempotent"]
body = json.dumps({"from": "app@bench.example", "to": ["user@example.org"], "subject": "bench",
                   "text": "x" * 2000}).encode()
lat, codes, lock = [], {}, threading.Lock()
def worker(w, n):
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    for i in range(n):
        t = time.monotonic()
        headers = {"Authorization": "Bearer bench-token", "Content-Type": "application/json"}
        if idempotent:
            headers["Idempotency-Key"] = f"bench-{start}-{w}-{i}"
        c.request("POST", "/api/v1/send", body, headers)
        r = c.getresponse(); r.read()
        with lock:
            lat.append(time.monotonic() - t); codes[r.status] = codes.get(r.status, 0) + 1
start = time.monotonic()
ts = [threading.Thread(target=worker, args=(w, total // threads)) for w in range(threads)]
[t.start() for t in ts]; [t.join() for t in ts]
el = time.monotonic() - start
lat.sort()
print(f"{len(lat)} sends in {el:.2f} s: {len(lat)/el:.0f}/s; p50 {lat[len(lat)//2]*1000:.1f} ms, p99 {lat[int(len(lat)*0.99)]*1000:.1f} ms; {codes}")
