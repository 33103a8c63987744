"""``auto`` against the MPI library and against the best algorithm, per size, from
``python -m mtcoll.bench --json`` files (every ratio from one run, side by side).

    MTCOLL_TUNING=off MTCOLL_CACHE_DIR=DIR mpiexec -n 8 python -m mpi4py -m mtcoll.bench \\
        --sizes 8,1K,64K,1M,4M,16M,64M --json r8.json
    python bench/auto_vs_best.py r8.json [--cache DIR]

Per size: native's mean time over auto's (``auto/native``, the bench's own ``vs native``
column), the best mean time of the MPI library and every mtcoll algorithm over auto's
(``auto/best``) and which that was, and MultiTree over native. With ``--cache DIR`` (the
``MTCOLL_CACHE_DIR`` of that run), also what the calibration chose at each size (``auto
ran``), read from the calibration file of that rank count (the newest, if several).
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path


def picks(cache, nranks):
    from mtcoll._calibrate import Calibration

    files = sorted(Path(cache).glob(f"calibration-{nranks}r-*.json"),
                   key=lambda p: p.stat().st_mtime)
    if not files:
        return None, None
    cal = Calibration(json.loads(files[-1].read_text()), str(files[-1]), "cache")
    return cal, (lambda b: cal.choose(b)[0])


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("files", nargs="+")
    p.add_argument("--cache", help="the run's MTCOLL_CACHE_DIR: show what auto ran")
    args = p.parse_args(argv)
    for f in args.files:
        d = json.loads(Path(f).read_text())
        by = defaultdict(dict)
        for r in d["results"]:
            by[r["bytes"]][r["algorithm"]] = r["time_avg_us"]
        nranks = d["meta"].get("ranks") or d["meta"].get("nranks")
        cal, pick = picks(args.cache, nranks) if args.cache else (None, None)
        print(f"{f}: {nranks} ranks" + (f"; calibration {cal.path}, probe "
                                         f"{cal.data['probe_seconds']:.2f} s" if cal else ""))
        print(f"{'size (B)':>10} {'auto/native':>11} {'auto/best':>9} {'best':>10} "
              f"{'auto ran':>9} {'multitree/native':>16}")
        worst_native = worst_best = float("inf")
        for b in sorted(by):
            t = by[b]
            others = {a: v for a, v in t.items() if a != "auto"}
            best = min(others, key=others.get)
            rn, rb = t["native"] / t["auto"], others[best] / t["auto"]
            worst_native, worst_best = min(worst_native, rn), min(worst_best, rb)
            mt = f"{t['native'] / t['multitree']:.2f}" if "multitree" in t else "-"
            print(f"{b:>10} {rn:>11.2f} {rb:>9.2f} {best:>10} {pick(b) if pick else '-':>9} "
                  f"{mt:>16}")
        print(f"{'lowest':>10} {worst_native:>11.2f} {worst_best:>9.2f}")


if __name__ == "__main__":
    main()
