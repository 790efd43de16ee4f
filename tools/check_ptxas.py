"""Read `ptxas -v` output (from a build log or stdin) and fail on any register spill.

Usage: python tools/check_ptxas.py BUILD_LOG --arch 80 --arch 90
Prints one row per kernel × arch (registers, stack, spill stores/loads) and exits 1 when a kernel spills,
or when an expected arch has no kernels at all (the check would otherwise pass vacuously).
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from fused_hourglass.kernel_report import demangle  # noqa: E402  (c++filt, shared with info --kernels)

ENTRY = re.compile(r"Compiling entry function '([^']+)' for 'sm_(\d+a?)'")
FRAME = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
USED = re.compile(r"Used (\d+) registers")


def parse(text: str) -> list[dict]:
    rows, current = [], None
    for line in text.splitlines():
        if m := ENTRY.search(line):
            current = {"kernel": m.group(1), "arch": m.group(2), "registers": None, "stack": 0, "spill_stores": 0,
                       "spill_loads": 0}
            rows.append(current)
        elif current is not None and (m := FRAME.search(line)):
            current["stack"], current["spill_stores"], current["spill_loads"] = map(int, m.groups())
        elif current is not None and (m := USED.search(line)):
            current["registers"] = int(m.group(1))
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("log", help="build log with ptxas -v output, or - for stdin")
    parser.add_argument("--arch", action="append", default=[], help="an arch that must appear, e.g. 80")
    args = parser.parse_args()
    text = sys.stdin.read() if args.log == "-" else open(args.log, errors="replace").read()
    rows = parse(text)
    # Each kernel is compiled once per object file that instantiates it; report each (kernel, arch) once.
    unique = {(r["kernel"], r["arch"]): r for r in rows}
    rows = sorted(unique.values(), key=lambda r: (r["arch"], r["kernel"]))
    names = demangle([r["kernel"] for r in rows])
    failed = False
    print(f"{'arch':<6} {'regs':>5} {'stack':>6} {'spill st':>9} {'spill ld':>9}  kernel")
    for r, name in zip(rows, names, strict=True):
        spill = r["spill_stores"] or r["spill_loads"]
        failed |= bool(spill)
        short = name if len(name) <= 110 else name[:107] + "..."
        print(f"sm_{r['arch']:<3} {r['registers'] or 0:>5} {r['stack']:>6} {r['spill_stores']:>9} "
              f"{r['spill_loads']:>9}  {short}{'   <-- SPILL' if spill else ''}")
    for arch in args.arch:
        if not any(r["arch"].rstrip("a") == arch for r in rows):
            print(f"error: no kernels compiled for sm_{arch} in the log", file=sys.stderr)
            failed = True
    print(f"{len(rows)} kernel×arch entries, {'SPILLS FOUND' if failed else 'no spills'}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
