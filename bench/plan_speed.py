"""Plan-plus-validate time and peak memory of MultiTree on 2-D tori (a benchmark, not a test).

    python bench/plan_speed.py                 # 8x8, 16x16, 32x32, 64x64 tori, ports 4
    python bench/plan_speed.py --sides 8 16    # a subset
    python bench/plan_speed.py --json out.json

Each size runs in a fresh Python process, so its peak resident memory (ru_maxrss) is its own;
the numba kernels are compiled (or loaded from the on-disk cache) before the clock starts, in
that process, and the load time is reported apart. Wall-clock seconds ("total s") are the
target's measure; CPU seconds (user + system, summed over the validator's two threads) are
printed beside them because a shared machine stretches wall time. Targets: 1024 ranks in at most 1 s,
4096 ranks in at most 15 s and 2 GiB.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

CHILD = r"""
import json, resource, sys, time
def cpu():
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime
t0 = time.perf_counter()
from mtcoll.plan import plan, validate
warm = plan("torus:4x4", engine="numba"); validate(warm, "torus:4x4", engine="numba")
t1 = time.perf_counter()
spec = sys.argv[1]
t2 = time.perf_counter()
c2 = cpu()
s = plan(spec, engine="numba")
t3 = time.perf_counter()
r = validate(s, spec, engine="numba")
t4 = time.perf_counter()
c4 = cpu()
print(json.dumps({"topology": spec, "nodes": s.nranks, "steps_per_phase": list(s.steps),
                  "lower_bound": r.lower_bound, "valid": r.valid,
                  "plan_s": t3 - t2, "validate_s": t4 - t3, "plan_validate_s": t4 - t2, "plan_validate_cpu_s": c4 - c2,
                  "numba_load_s": t1 - t0,
                  "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sides", type=int, nargs="+", default=[8, 16, 32, 64],
                   help="torus sides (N = side^2); default: %(default)s")
    p.add_argument("--json", nargs="?", const="-", default=None, metavar="FILE")
    args = p.parse_args(argv)
    rows = []
    hdr = f"{'topology':<12} {'nodes':>6} {'steps':>6} {'bound':>6} {'valid':>5} " \
          f"{'plan s':>8} {'valid. s':>8} {'total s':>8} {'cpu s':>8} {'peak MiB':>9} " \
          f"{'numba load s':>12}"
    if args.json != "-":
        print(hdr)
    for side in args.sides:
        spec = f"torus:{side}x{side}"
        out = subprocess.run([sys.executable, "-c", CHILD, spec], capture_output=True, text=True)
        if out.returncode:
            print(out.stderr, file=sys.stderr)
            return 1
        r = json.loads(out.stdout.strip().splitlines()[-1])
        rows.append(r)
        if args.json != "-":
            print(f"{spec:<12} {r['nodes']:>6} {r['steps_per_phase'][0]:>6} {r['lower_bound']:>6} "
                  f"{str(r['valid']):>5} {r['plan_s']:>8.3f} {r['validate_s']:>8.3f} "
                  f"{r['plan_validate_s']:>8.3f} {r['plan_validate_cpu_s']:>8.3f} "
                  f"{r['peak_rss_mib']:>9.0f} "
                  f"{r['numba_load_s']:>12.2f}", flush=True)
    if args.json:
        text = json.dumps({"results": rows}, indent=2)
        if args.json == "-":
            print(text)
        else:
            with open(args.json, "w") as f:
                f.write(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
