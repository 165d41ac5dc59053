"""Measurements and the report of scripts/compare.sh (standard library, and
matplotlib for the plot).

    compare.py cpu [--children] PID...     CPU seconds (user + system) of the
        processes; --children adds the children they reaped and those
        still running (a Postfix master and its daemons)
    compare.py load-cpu SINK_PID FILE...   CPU seconds of the load tools:
        smtp-sink's (by PID) and the smtp-source runs' (each FILE the
        output of a shell's `times`, whose second line is its children's)
    compare.py hwm PID...                  the largest peak RSS (VmHWM), KiB
    compare.py hist PORT...                the accept-latency histogram of
        the nodes with these admin ports, summed, as JSON
    compare.py accept PORT...              one line on that histogram: the
        mean, p50 and p99 (bucket bounds), how many took over 10 ms
    compare.py sent PORT...                the Redis commands those nodes
        sent (smarthost_redis_commands_total), summed
    compare.py wait-sink FILE COUNT SECONDS
        waits until smtp-sink's counters (-c, in FILE) show COUNT messages
        and prints that moment (Unix time); exits 1 after SECONDS
    compare.py record FILE KEY=VALUE...    appends one run as a JSON line
    compare.py report FILE OUTDIR [--plot] the table (Markdown, to stdout),
        OUTDIR/compare.json and compare.csv, and OUTDIR/compare.png; with
        several rounds, one row per cell and system (the median run) and
        every run under "rounds" in compare.json
    compare.py plot JSON PNG               the plot again, from compare.json
    compare.py sample FILE PORT...         every 0.25 s until killed, appends
        each node's open outgoing connections (by admin port) to FILE
    compare.py timeline FILE START END SLOTS
        from a sample FILE: each node's open connections against its SLOTS,
        in tenths of the run from START to END (Unix times)
"""

import csv
import json
import os
import re
import statistics
import sys
import time
import urllib.request

HIST = "smarthost_message_accept_seconds"
TICKS = os.sysconf("SC_CLK_TCK")


def stat_fields(pid):
    with open(f"/proc/{pid}/stat") as f:
        # The command name is in parentheses and may hold spaces.
        return f.read().rsplit(")", 1)[1].split()


def cpu(args):
    children = "--children" in args
    pids = [int(a) for a in args if a != "--children"]
    ticks = 0
    for pid in pids:
        try:
            f = stat_fields(pid)
        except OSError:
            continue
        # After ")": state is [0], utime [11], stime [12], cutime [13], cstime [14].
        ticks += int(f[11]) + int(f[12])
        if children:
            ticks += int(f[13]) + int(f[14])
            for entry in os.listdir("/proc"):
                if not entry.isdigit():
                    continue
                try:
                    c = stat_fields(entry)
                except OSError:
                    continue
                if int(c[1]) == pid:
                    ticks += int(c[11]) + int(c[12])
    print(f"{ticks / TICKS:.2f}")


def cpu_seconds(pid):
    """User + system seconds of one process, 0 when it is gone."""
    try:
        f = stat_fields(pid)
    except OSError:
        return 0.0
    return (int(f[11]) + int(f[12])) / TICKS


TIMES = re.compile(r"(\d+)m([\d.]+)s")


def load_cpu(args):
    total = cpu_seconds(int(args[0]))
    for path in args[1:]:
        try:
            lines = open(path).read().splitlines()
        except OSError:
            continue
        if len(lines) >= 2:
            total += sum(int(m) * 60 + float(s) for m, s in TIMES.findall(lines[1]))
    print(f"{total:.2f}")


def hwm(args):
    peak = 0
    for pid in args:
        try:
            with open(f"/proc/{pid}/status") as f:
                for line in f:
                    if line.startswith("VmHWM:"):
                        peak = max(peak, int(line.split()[1]))
        except OSError:
            pass
    print(peak)


def accept_latency(ports):
    """The accept-latency histogram of the nodes, summed: cumulative bucket
    counts by upper bound, and the sum of the observed seconds."""
    buckets, total = {}, 0.0
    pattern = re.compile(HIST + r'_bucket\{le="([^"]+)"\} (\S+)')
    for port in ports:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
            page = r.read().decode()
        for m in pattern.finditer(page):
            buckets[m.group(1)] = buckets.get(m.group(1), 0) + float(m.group(2))
        m = re.search(HIST + r"_sum (\S+)", page)
        total += float(m.group(1)) if m else 0.0
    return buckets, total


def sent(args):
    """Redis commands the nodes with these admin ports sent, summed
    (smarthost_redis_commands_total: a script call counts once)."""
    total = 0.0
    for port in args:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
            page = r.read().decode()
        total += sum(float(m.group(1)) for m in
                     re.finditer(r"^smarthost_redis_commands_total\{[^}]*\} (\S+)$", page, re.M))
    print(f"{total:.0f}")


def hist(args):
    """Cumulative bucket counts by upper bound, summed over the nodes."""
    print(json.dumps(accept_latency(args)[0]))


def accept(args):
    """One line on the accept latency since the nodes started."""
    buckets, total = accept_latency(args)
    n = buckets.get("+Inf", 0)
    if n <= 0:
        print("  acceptance latency: nothing observed")
        return
    over = n - buckets.get("0.01", 0)
    print(f"  acceptance latency: mean {total / n * 1000:.2f} ms, "
          f"p50 {ms(quantile(None, buckets, 0.5))}, "
          f"p99 {ms(quantile(None, buckets, 0.99))}, "
          f"{over:.0f} of {n:.0f} over 10 ms")


def wait_sink(args):
    path, want, seconds = args[0], int(args[1]), float(args[2])
    deadline = time.time() + seconds
    seen = 0
    while time.time() < deadline:
        try:
            with open(path, "rb") as f:
                f.seek(max(0, os.path.getsize(path) - 200))
                found = re.findall(rb"mesg=(\d+)", f.read())
            if found:
                seen = int(found[-1])
        except OSError:
            pass
        if seen >= want:
            print(f"{time.time():.3f}")
            return 0
        time.sleep(0.01)
    print(f"the sink counted {seen} of {want} messages in {seconds:.0f} s", file=sys.stderr)
    return 1


def record(args):
    row = {}
    for arg in args[1:]:
        key, _, value = arg.partition("=")
        if key.startswith("hist_"):
            value = json.load(open(value)) if value and os.path.getsize(value) else None
        row[key] = value
    with open(args[0], "a") as f:
        f.write(json.dumps(row) + "\n")


OPEN = re.compile(r"^smarthost_outbound_connections (\S+)$", re.M)


def sample(args):
    path, ports = args[0], args[1:]
    with open(path, "a") as out:
        while True:
            now = time.time()
            counts = []
            for port in ports:
                try:
                    url = f"http://127.0.0.1:{port}/metrics"
                    with urllib.request.urlopen(url, timeout=2) as r:
                        m = OPEN.search(r.read().decode())
                    counts.append(str(round(float(m.group(1)))) if m else "0")
                except OSError:
                    counts.append("-")
            out.write(f"{now:.3f} {' '.join(counts)}\n")
            out.flush()
            # Not more often: a scrape counts the queue, a few Redis
            # commands per domain with work.
            time.sleep(max(0.0, 0.25 - (time.time() - now)))


def timeline(args):
    """Mean open connections per node in each tenth of the run: where the
    cluster's capacity sat idle (start, middle or tail)."""
    path, start, end, slots = args[0], float(args[1]), float(args[2]), int(args[3])
    rows = []
    for line in open(path):
        t, *counts = line.split()
        if start <= float(t) <= end and "-" not in counts:
            rows.append((float(t), [int(c) for c in counts]))
    if not rows:
        print("  no connection samples")
        return
    nodes = len(rows[0][1])
    tenth = (end - start) / 10
    cells = []
    for i in range(10):
        part = [c for t, c in rows if start + i * tenth <= t < start + (i + 1) * tenth]
        if not part:
            cells.append(["–"] * nodes)
            continue
        cells.append([f"{sum(c[n] for c in part) / len(part):.1f}" for n in range(nodes)])
    print(f"  open connections (of {slots} a node), mean in each tenth of the run:")
    for n in range(nodes):
        overall = sum(c[n] for _, c in rows) / len(rows) / slots
        print(f"    node {n + 1}: {' '.join(f'{row[n]:>4}' for row in cells)}   busy {overall:.2f}")


def num(value):
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def quantile(before, after, q):
    """Upper bound of the bucket that holds quantile q of what was observed
    between the two scrapes: bucket resolution, not an exact figure."""
    if not after:
        return None
    before = before or {}
    bounds = sorted(after, key=lambda le: float("inf") if le == "+Inf" else float(le))
    counts = [after[le] - before.get(le, 0) for le in bounds]
    total = counts[-1] if bounds[-1] == "+Inf" else max(counts, default=0)
    if total <= 0:
        return None
    for le, c in zip(bounds, counts):
        if c >= q * total:
            return float("inf") if le == "+Inf" else float(le)
    return float("inf")


def derive(rows):
    """Rates, ratios and per-message costs from the raw runs."""
    out = []
    for r in rows:
        n = int(r["messages"])
        start, accepted, end = num(r.get("start")), num(r.get("accepted")), num(r.get("end"))
        d = {
            "size": int(r["size"]),
            "sessions": int(r["sessions"]),
            "per_connection": int(r["per_connection"]),
            "system": r["system"],
            "round": int(r.get("round") or 1),
            "messages": n,
            "connections": int(r["connections"]),
            "status": r["status"],
            "seconds": round(end - start, 3) if end else None,
            "messages_per_s": round(n / (end - start), 1) if end else None,
            "accepted_per_s": round(n / (accepted - start), 1) if accepted else None,
        }
        for key, name in (("cpu_relay", "cpu_s_per_1000"), ("cpu_redis", "redis_cpu_s_per_1000")):
            v = num(r.get(key))
            d[name] = round(v / n * 1000, 3) if v is not None and r["status"] == "ok" else None
        tools = num(r.get("cpu_tools"))
        d["tools_cpu_s_per_1000"] = round(tools / n * 1000, 3) if tools is not None and r["status"] == "ok" else None
        # The relay, Redis and the load tools over the run, in cores: near
        # the machine's count, the run was bound by CPU.
        spent = [num(r.get(k)) for k in ("cpu_relay", "cpu_redis", "cpu_tools")]
        d["cores_busy"] = (round(sum(v for v in spent if v is not None) / d["seconds"], 2)
                           if tools is not None and d["seconds"] and r["status"] == "ok" else None)
        rss = num(r.get("rss_kib"))
        d["peak_rss_mib"] = round(rss / 1024, 1) if rss else None
        calls = num(r.get("redis_calls"))
        d["redis_commands_per_message"] = round(calls / n, 1) if calls is not None and r["status"] == "ok" else None
        sent_calls = num(r.get("redis_sent"))
        d["redis_sent_per_message"] = (round(sent_calls / n, 2)
                                       if sent_calls is not None and r["status"] == "ok" else None)
        d["delivered_logged"] = int(r["delivered_logged"]) if r.get("delivered_logged") else None
        for q, name in ((0.5, "accept_p50_s"), (0.99, "accept_p99_s")):
            d[name] = quantile(r.get("hist_before"), r.get("hist_after"), q)
        out.append(d)
    # Each run against the anchors of its own round: the machine's pace
    # moves between rounds, alike for every system in one round.
    by_cell = {}
    for d in out:
        by_cell.setdefault(cell_of(d) + (d["round"],), {})[d["system"]] = d
    for d in out:
        cell = by_cell[cell_of(d) + (d["round"],)]
        for ref in ("postfix", "direct"):
            base = cell.get(ref, {}).get("messages_per_s")
            d[f"vs_{ref}"] = round(d["messages_per_s"] / base, 2) if d["messages_per_s"] and base else None
    return out


def cell_of(d):
    return (d["size"], d["sessions"], d["per_connection"])


def combine(runs):
    """One row per cell and system. With several rounds: the run with the
    median messages/s, with its costs and latencies; its ratios are the
    medians of each round's own ratios; min and max give the spread of
    messages/s. A median of an even count is the lower of the middle two."""
    groups = {}
    for d in runs:
        groups.setdefault(cell_of(d) + (d["system"],), []).append(d)
    out = []
    for group in groups.values():
        done = sorted((d for d in group if d["messages_per_s"]), key=lambda d: d["messages_per_s"])
        row = dict(done[(len(done) - 1) // 2] if done else group[0])
        row["rounds"] = len(group)
        row["messages_per_s_min"] = done[0]["messages_per_s"] if done else None
        row["messages_per_s_max"] = done[-1]["messages_per_s"] if done else None
        for ref in ("postfix", "direct"):
            ratios = [d[f"vs_{ref}"] for d in done if d[f"vs_{ref}"] is not None]
            row[f"vs_{ref}"] = round(statistics.median_low(ratios), 2) if ratios else None
        out.append(row)
    return out


LABELS = {
    "direct": "direct (source → sink)",
    "postfix": "Postfix 3.7",
    "smarthost": "smarthost, local spool",
    "redis": "smarthost, Redis, 1 node",
    "redis3": "smarthost, Redis, 3 nodes",
    "cluster": "smarthost, Redis Cluster, 1 node",
}


def fmt(v, spec="{:.0f}", none="–"):
    if v is None:
        return none
    if v == float("inf"):
        return "> 120 s"
    return spec.format(v)


def count(v):
    """A rate with a space between thousands, as the tables write it."""
    return fmt(v, "{:,.0f}").replace(",", " ")


def ms(v):
    if v is None:
        return "–"
    if v == float("inf"):
        return "> 120 s"
    return f"≤ {v * 1000:g} ms"


def size_label(size):
    return f"{size // 1024} KB" if size >= 1024 else f"{size} B"


def table(rows):
    head = ("| size | sessions | msgs/conn | system | msg/s | × Postfix | × direct "
            "| accepted msg/s | CPU s/1k msgs | Redis CPU s/1k | load tools CPU s/1k "
            "| cores busy | peak RSS MiB "
            "| Redis cmds/msg sent | Redis cmds/msg run | accept p50 | accept p99 |")
    lines = [head, "|" + " --- |" * head.count(" | ") + " --- |"]
    for d in rows:
        rate = count(d["messages_per_s"])
        if d["status"] != "ok":
            rate = f"{d['status']}"
        lines.append(
            f"| {size_label(d['size'])} | {d['sessions']} | {d['per_connection']} "
            f"| {LABELS.get(d['system'], d['system'])} | {rate} "
            f"| {fmt(d['vs_postfix'], '{:.2f}')} | {fmt(d['vs_direct'], '{:.2f}')} "
            f"| {count(d['accepted_per_s'])} "
            f"| {fmt(d['cpu_s_per_1000'], '{:.2f}')} | {fmt(d['redis_cpu_s_per_1000'], '{:.2f}')} "
            f"| {fmt(d.get('tools_cpu_s_per_1000'), '{:.2f}')} | {fmt(d.get('cores_busy'), '{:.2f}')} "
            f"| {fmt(d['peak_rss_mib'], '{:.0f}')} | {fmt(d.get('redis_sent_per_message'), '{:.2f}')} "
            f"| {fmt(d['redis_commands_per_message'], '{:.1f}')} "
            f"| {ms(d['accept_p50_s'])} | {ms(d['accept_p99_s'])} |"
        )
    return "\n".join(lines)


def summary(rows):
    """One line per cell: each system's messages/s end to end."""
    systems = [s for s in LABELS if any(d["system"] == s for d in rows)]
    cells = []
    for d in rows:
        cell = (d["size"], d["sessions"], d["per_connection"])
        if cell not in cells:
            cells.append(cell)
    head = "| size | sessions | msgs/conn | " + " | ".join(LABELS[s] for s in systems) + " |"
    lines = [head, "|" + " --- |" * (3 + len(systems))]
    for cell in cells:
        rates = []
        for system in systems:
            d = next((d for d in rows if (d["size"], d["sessions"], d["per_connection"]) == cell
                      and d["system"] == system), None)
            if d is None:
                rates.append("")
            elif d["status"] != "ok":
                rates.append(d["status"])
            else:
                rate = count(d["messages_per_s"])
                if d.get("rounds", 1) > 1 and d["messages_per_s_min"] is not None:
                    rate += f" ({count(d['messages_per_s_min'])}–{count(d['messages_per_s_max'])})"
                rates.append(rate)
        lines.append(f"| {size_label(cell[0])} | {cell[1]} | {cell[2]} | " + " | ".join(rates) + " |")
    return "\n".join(lines)


def plot(rows, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter, NullLocator

    sizes = sorted({d["size"] for d in rows})
    pers = sorted({d["per_connection"] for d in rows})
    rounds = max((d.get("rounds", 1) for d in rows), default=1)
    fig, axes = plt.subplots(len(sizes), len(pers), figsize=(5.5 * len(pers), 4 * len(sizes)),
                             squeeze=False)
    systems = [s for s in LABELS if any(d["system"] == s for d in rows)]
    for i, size in enumerate(sizes):
        for j, per in enumerate(pers):
            ax = axes[i][j]
            for system in systems:
                pts = sorted((d["sessions"], d["messages_per_s"]) for d in rows
                             if d["system"] == system and d["size"] == size
                             and d["per_connection"] == per and d["messages_per_s"])
                if pts:
                    ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=LABELS[system])
            ax.set_xscale("log")
            ax.set_yscale("log")
            xs = sorted({d["sessions"] for d in rows})
            ax.set_xticks(xs)
            ax.set_xticklabels([str(x) for x in xs])
            ax.xaxis.set_minor_locator(NullLocator())
            ax.yaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
            ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:,.0f}".replace(",", " ")))
            ax.yaxis.set_minor_formatter(NullFormatter())
            ax.set_title(f"{size_label(size)} messages, {per} per connection")
            ax.set_xlabel("parallel sessions")
            ax.set_ylabel("messages/s, end to end")
            ax.grid(True, which="both", alpha=0.3)
    axes[0][0].legend(fontsize="small")
    fig.suptitle("Loopback relay to smtp-sink, one run on one machine" if rounds <= 1 else
                 f"Loopback relay to smtp-sink, median of {rounds} rounds on one machine")
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def report(args):
    path, outdir = args[0], args[1]
    rows = []
    with open(path) as f:
        for line in f:
            if line.strip():
                rows.append(json.loads(line))
    meta = {}
    if os.path.exists(path + ".meta"):
        meta = json.load(open(path + ".meta"))
    runs = derive(rows)
    derived = combine(runs)
    rounds = max((d["rounds"] for d in derived), default=1)
    if rounds > 1:
        print(f"Medians of {rounds} rounds; messages/s end to end, with the lowest and "
              "highest of the rounds:")
    else:
        print("Messages/s end to end:")
    print()
    print(summary(derived))
    print()
    print(table(derived))
    print()
    print("msg/s: first message sent to the last one received by smtp-sink. "
          "CPU: user + system seconds of the relay's processes (all of Postfix's; "
          "the smarthost nodes), of redis-server (every server of a Cluster; with its AOF rewrites) and of the load tools (smtp-source "
          "and smtp-sink), per 1 000 messages. Cores busy: all of them together over "
          "the run, in cores. Peak RSS: "
          "VmHWM of the largest smarthost node. Redis cmds/msg sent: the commands "
          "the nodes sent (their smarthost_redis_commands_total; a script call "
          "counts once). Redis cmds/msg run: every command redis-server ran "
          "(INFO commandstats), those its Lua scripts ran included. "
          "accept p50/p99: smarthost's "
          f"{HIST} histogram over the run, as the upper bound of its bucket."
          + (" With rounds: each row is the run with the median msg/s; × Postfix and "
             "× direct are the medians of the rounds' own ratios." if rounds > 1 else ""))
    os.makedirs(outdir, exist_ok=True)
    # A latency past the last bucket has no number: null in the files.
    def with_nulls(rows):
        return [{k: (None if v == float("inf") else v) for k, v in d.items()} for d in rows]

    finite, every = with_nulls(derived), with_nulls(runs)
    with open(os.path.join(outdir, "compare.json"), "w") as f:
        json.dump({"machine": meta, "runs": finite, "rounds": every}, f, indent=1)
        f.write("\n")
    with open(os.path.join(outdir, "compare.csv"), "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(finite[0].keys()) if finite else [])
        w.writeheader()
        for d in finite:
            w.writerow(d)
    written = ["compare.json", "compare.csv"]
    if "--plot" in args:
        plot(derived, os.path.join(outdir, "compare.png"))
        written.append("compare.png")
    print(f"\nwritten to {outdir}: {', '.join(written)}", file=sys.stderr)


def main():
    cmd, args = sys.argv[1], sys.argv[2:]
    if cmd == "cpu":
        cpu(args)
    elif cmd == "load-cpu":
        load_cpu(args)
    elif cmd == "hwm":
        hwm(args)
    elif cmd == "hist":
        hist(args)
    elif cmd == "accept":
        accept(args)
    elif cmd == "sent":
        sent(args)
    elif cmd == "wait-sink":
        return wait_sink(args)
    elif cmd == "record":
        record(args)
    elif cmd == "report":
        report(args)
    elif cmd == "sample":
        sample(args)
    elif cmd == "timeline":
        timeline(args)
    elif cmd == "plot":
        plot(json.load(open(args[0]))["runs"], args[1])
    else:
        print(__doc__, file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
