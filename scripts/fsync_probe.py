"""What a write and its fdatasync cost in a directory (standard library
only). Two probes:

    python3 scripts/fsync_probe.py DIR [ROUNDS] [WRITES] [SIZE]

How long a small write and its fdatasync take, by how the file's space was
made. For each round and way, writes WRITES blocks of SIZE bytes one after
the other into a new file in DIR, each followed by fdatasync, and prints
the median, p90 and p99 of those calls:

    append      the file grows with each write (as the local spool's
                journal segments do)
    sparse      the file was set to its full size first (ftruncate)
    fallocated  its blocks were allocated first (posix_fallocate)
    zeroed      zeros were written to its full size and synced first

A write that changes the file's size makes fdatasync write the inode too
(on a journaling file system, a journal commit); the last three never
change it.

    python3 scripts/fsync_probe.py sizes DIR [ROUNDS] [TOTAL_MB]

What appending costs in CPU by the size of each write call. Writes
TOTAL_MB (default 600) into a new file in DIR, one write call of the
given size after the other, each group followed by fdatasync (as the
local spool's journal commits), and prints the CPU seconds (user +
system) and the wall time of each run. The ways run in a shuffled order,
ROUNDS (default 4) times each:

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

import contextlib
import os
import random
import resource
import statistics
import sys
import time

WAYS = ("append", "sparse", "fallocated", "zeroed")

MIB = 1 << 20
# Bytes per fdatasync, bytes per write call, offset of the first write.
SIZES = {
    "1MiB": (MIB, MIB, 0),
    "2MiB": (2 * MIB, 2 * MIB, 0),
    "2MiB+4KiB": (2 * MIB, 2 * MIB, 4096),
    "3MiB": (3 * MIB, 3 * MIB, 0),
    "3MiB/1MiB": (3 * MIB, MIB, 0),
}


@contextlib.contextmanager
def new_file(directory: str, name: str):
    """A new, empty file in DIR, removed afterwards."""
    path = os.path.join(directory, name)
    fd = os.open(path, os.O_CREAT | os.O_RDWR | os.O_TRUNC, 0o600)
    try:
        yield fd
    finally:
        os.close(fd)
        os.remove(path)


def probe(directory: str, way: str, writes: int, size: int) -> list:
    with new_file(directory, f"fsync-probe-{way}") as fd:
        full = writes * size
        if way == "sparse":
            os.ftruncate(fd, full)
        elif way == "fallocated":
            os.posix_fallocate(fd, 0, full)
        elif way == "zeroed":
            os.pwrite(fd, b"\0" * full, 0)
        os.fsync(fd)
        block = b"x" * size
        times = []
        for i in range(writes):
            start = time.perf_counter()
            os.pwrite(fd, block, i * size)
            os.fdatasync(fd)
            times.append(time.perf_counter() - start)
        return sorted(times)


def cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def probe_size(directory: str, way: str, total: int) -> tuple:
    per_sync, per_call, start = SIZES[way]
    with new_file(directory, "fsync-probe-sizes") as fd:
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


def arg(args: list, n: int, default: int) -> int:
    return int(args[n]) if len(args) > n else default


def fsync_times(args: list) -> None:
    directory = args[0]
    rounds, writes, size = arg(args, 1, 2), arg(args, 2, 2000), arg(args, 3, 2048)
    print(f"{directory}: {writes} writes of {size} bytes, each with fdatasync")
    for _ in range(rounds):
        for way in WAYS:
            t = probe(directory, way, writes, size)
            us = lambda q: t[min(len(t) - 1, int(q * len(t)))] * 1e6
            print(f"  {way:<10} median {statistics.median(t) * 1e6:5.0f} µs, "
                  f"p90 {us(0.9):5.0f}, p99 {us(0.99):5.0f}")


def write_sizes(args: list) -> None:
    directory = args[0]
    rounds, total = arg(args, 1, 4), arg(args, 2, 600) * MIB
    runs = [way for way in SIZES for _ in range(rounds)]
    random.shuffle(runs)
    results = {way: [] for way in SIZES}
    for way in runs:
        results[way].append(probe_size(directory, way, total))
    for way, taken in results.items():
        cpus = ", ".join(f"{c:.2f}" for c, _ in taken)
        walls = ", ".join(f"{w:.2f}" for _, w in taken)
        print(f"{way:10} CPU s: {cpus}   wall s: {walls}")


def main() -> None:
    args = sys.argv[1:]
    if args[:1] == ["sizes"]:
        args = args[1:]
        if not args:
            sys.exit(__doc__)
        write_sizes(args)
    elif args:
        fsync_times(args)
    else:
        sys.exit(__doc__)


if __name__ == "__main__":
    main()
