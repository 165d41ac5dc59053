"""What appending to a file costs in CPU by the size of each write call
(standard library only).

    python3 scripts/write_size_probe.py DIR [ROUNDS] [TOTAL_MB]

Writes TOTAL_MB (default 600) into a new file in DIR, one write call of
the given size after the other, each followed by fdatasync (as the local
spool's journal commits), and prints the CPU seconds (user + system) and
the wall time each way took. The ways run in a shuffled order, ROUNDS
(default 4) times each:

    1MiB          1 MiB a call, from offset 0
    2MiB          2 MiB a call, from offset 0: every call covers an
                  aligned 2 MiB of the file
    2MiB+4KiB     2 MiB a call, from offset 4 KiB: none does
    3MiB          3 MiB a call, from offset 0
    3MiB/1MiB     3 MiB per fdatasync, written 1 MiB a call

The page cache may give a write that covers an aligned 2 MiB a folio of
that size; where those are dear (a virtual machine that hands its free
memory back to the host), the 2 MiB and 3 MiB ways cost several times
the others.
"""

import os
import random
import resource
import sys
import time

MIB = 1 << 20
WAYS = {
    "1MiB": (MIB, MIB, 0),
    "2MiB": (2 * MIB, 2 * MIB, 0),
    "2MiB+4KiB": (2 * MIB, 2 * MIB, 4096),
    "3MiB": (3 * MIB, 3 * MIB, 0),
    "3MiB/1MiB": (3 * MIB, MIB, 0),
}


def cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def probe(directory: str, way: str, total: int) -> tuple:
    per_sync, per_call, start = WAYS[way]
    path = os.path.join(directory, "write-size-probe")
    fd = os.open(path, os.O_CREAT | os.O_RDWR | os.O_TRUNC, 0o600)
    try:
        if start:
            os.pwrite(fd, b"\n" * start, 0)
        data = os.urandom(per_sync)
        at = start
        cpu0, wall0 = cpu(), time.perf_counter()
        while at < total:
            for piece in range(0, per_sync, per_call):
                os.pwrite(fd, data[piece : piece + per_call], at + piece)
            os.fdatasync(fd)
            at += per_sync
        return cpu() - cpu0, time.perf_counter() - wall0
    finally:
        os.close(fd)
        os.remove(path)


def main() -> None:
    if len(sys.argv) < 2:
        sys.exit(__doc__)
    directory = sys.argv[1]
    rounds = int(sys.argv[2]) if len(sys.argv) > 2 else 4
    total = (int(sys.argv[3]) if len(sys.argv) > 3 else 600) * MIB
    runs = [way for way in WAYS for _ in range(rounds)]
    random.shuffle(runs)
    results = {way: [] for way in WAYS}
    for way in runs:
        results[way].append(probe(directory, way, total))
    for way, taken in results.items():
        cpus = ", ".join(f"{c:.2f}" for c, _ in taken)
        walls = ", ".join(f"{w:.2f}" for _, w in taken)
        print(f"{way:10} CPU s: {cpus}   wall s: {walls}")


if __name__ == "__main__":
    main()
