"""How long a small write and its fdatasync take in a directory, by how the
file's space was made (standard library only).

    python3 scripts/fsync_probe.py DIR [ROUNDS] [WRITES] [SIZE]

For each round and way, writes WRITES blocks of SIZE bytes one after the
other into a new file in DIR, each followed by fdatasync, and prints the
median, p90 and p99 of those calls:

    append      the file grows with each write (as the local spool's
                journal segments do)
    sparse      the file was set to its full size first (ftruncate)
    fallocated  its blocks were allocated first (posix_fallocate)
    zeroed      zeros were written to its full size and synced first

A write that changes the file's size makes fdatasync write the inode too
(on a journaling file system, a journal commit); the last three never
change it.
"""

import os
import statistics
import sys
import time

WAYS = ("append", "sparse", "fallocated", "zeroed")


def probe(directory: str, way: str, writes: int, size: int) -> list:
    path = os.path.join(directory, f"fsync-probe-{way}")
    if os.path.exists(path):
        os.remove(path)
    fd = os.open(path, os.O_CREAT | os.O_RDWR, 0o600)
    try:
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
    finally:
        os.close(fd)
        os.remove(path)


def main() -> None:
    if len(sys.argv) < 2:
        sys.exit(__doc__)
    directory = sys.argv[1]
    rounds = int(sys.argv[2]) if len(sys.argv) > 2 else 2
    writes = int(sys.argv[3]) if len(sys.argv) > 3 else 2000
    size = int(sys.argv[4]) if len(sys.argv) > 4 else 2048
    print(f"{directory}: {writes} writes of {size} bytes, each with fdatasync")
    for _ in range(rounds):
        for way in WAYS:
            t = probe(directory, way, writes, size)
            us = lambda q: t[min(len(t) - 1, int(q * len(t)))] * 1e6
            print(f"  {way:<10} median {statistics.median(t) * 1e6:5.0f} µs, "
                  f"p90 {us(0.9):5.0f}, p99 {us(0.99):5.0f}")


if __name__ == "__main__":
    main()
