"""Plan-plus-validate time and peak memory of MultiTree on 2-D tori (a benchmark, not a test).

    python bench/plan_speed.py                 # 8x8, 16x16, 32x32, 64x64 tori, ports 4
    python bench/plan_speed.py --sides 8 16    # a subset
    python bench/plan_speed.py --json out.json
    # the timed planner on 1024 ranks with unequal links (target: plan in at most 2 s)
    python bench/plan_speed.py --algorithm timed --sides 32 --options /20mbit/dim1=40mbit/0-1=5mbit
    # MultiTree by translation of one tree (64x64 also as a whole schedule, general validator)
    python bench/plan_speed.py --engine translate --sides 64 128
    python bench/plan_speed.py --engine translate --sides 64 --whole

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

TRANSLATED = r"""
import json, resource, sys, time
cap = int(sys.argv[3])
if cap:
    resource.setrlimit(resource.RLIMIT_AS, (cap, cap))
def cpu():
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime
from mtcoll.plan import translate, validate
from mtcoll.topology import parse
spec, whole = sys.argv[1], sys.argv[4] == "1"
t2, c2 = time.perf_counter(), cpu()
tr = translate(spec)
t3, c3 = time.perf_counter(), cpu()
errs = tr.check()
t4, c4 = time.perf_counter(), cpu()
summary = tr.summary()
sample = sorted({int(r) for r in range(0, tr.nranks, max(1, tr.nranks // 64))})
parts = [len(tr.rank_part(r, summary).to_bytes()) for r in sample]
t5, c5 = time.perf_counter(), cpu()
out = {"topology": spec, "algorithm": "multitree", "engine": "translate", "nodes": tr.nranks,
       "steps_per_phase": [tr.nsteps, tr.nsteps], "lower_bound": parse(spec).lower_bound(),
       "valid": not errs, "transfers": 2 * tr.nranks * (tr.nranks - 1),
       "plan_s": t3 - t2, "plan_cpu_s": c3 - c2, "validate_s": t4 - t3, "validate_cpu_s": c4 - c3,
       "plan_validate_s": t4 - t2, "plan_validate_cpu_s": c4 - c2,
       "part_bytes_max": max(parts), "part_s_each": (t5 - t4) / len(sample), "numba_load_s": 0.0,
       "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
if whole:  # the whole schedule, checked by the general validator: a cross-check
    t6, c6 = time.perf_counter(), cpu()
    r = validate(tr.schedule(), spec, engine="numba")
    out.update(whole_valid=r.valid, whole_lower_bound=r.lower_bound,
               whole_s=time.perf_counter() - t6, whole_cpu_s=cpu() - c6,
               whole_peak_rss_mib=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
print(json.dumps(out))
"""

CHILD = r"""
import json, resource, sys, time
cap = int(sys.argv[3])
if cap:  # address-space cap: a run that would exceed it fails instead of swapping
    resource.setrlimit(resource.RLIMIT_AS, (cap, cap))
def cpu():
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime
t0 = time.perf_counter()
from mtcoll.plan import plan, validate
algo = sys.argv[2]
warm = plan("torus:4x4/1mbit/0-1=2mbit", algo, engine="numba")
validate(warm, "torus:4x4/1mbit/0-1=2mbit", engine="numba")
t1 = time.perf_counter()
spec = sys.argv[1]
t2 = time.perf_counter()
c2 = cpu()
s = plan(spec, algo, engine="numba")
t3 = time.perf_counter()
c3 = cpu()
r = validate(s, spec, engine="numba")
t4 = time.perf_counter()
c4 = cpu()
print(json.dumps({"topology": spec, "algorithm": algo, "nodes": s.nranks,
                  "transfers": s.ntransfers, "validate_cpu_s": c4 - c3, "steps_per_phase": list(s.steps),
                  "lower_bound": r.lower_bound, "valid": r.valid,
                  "plan_s": t3 - t2, "plan_cpu_s": c3 - c2, "validate_s": t4 - t3, "plan_validate_s": t4 - t2, "plan_validate_cpu_s": c4 - c2,
                  "numba_load_s": t1 - t0,
                  "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


# peak bytes per (rank count)^2, measured on torus:64x64 (4096 ranks: 3.46 GB); the schedule
# holds N^2 transfers, so a size whose estimate exceeds the cap is not started
PEAK_PER_N2 = 3.46e9 / 4096**2


def _estimated_peak(n):
    return PEAK_PER_N2 * n * n


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sides", type=int, nargs="+", default=[8, 16, 32, 64],
                   help="torus sides (N = side^2); default: %(default)s")
    p.add_argument("--algorithm", default="multitree", help="default: %(default)s")
    p.add_argument("--engine", default="numba", choices=("numba", "translate"),
                   help="numba: the general MultiTree grower (default); translate: tree 0 on "
                        "a plain 2-D torus and its translates (mtcoll.plan.translate), "
                        "validated by its own check, parts computed per rank")
    p.add_argument("--whole", action="store_true",
                   help="with --engine translate: also build the whole schedule and run the "
                        "general validator on it (a cross-check; O(N^2) memory)")
    p.add_argument("--options", default="", metavar="/OPT...",
                   help="spec options appended to every torus, e.g. /20mbit/0-1=5mbit")
    p.add_argument("--cap-gib", type=float, default=6.0,
                   help="address-space cap of each run; a size whose estimated peak (the "
                        "schedule's transfers grow as N^2) exceeds it is skipped "
                        "(default: %(default)s; 0: no cap)")
    p.add_argument("--json", nargs="?", const="-", default=None, metavar="FILE")
    args = p.parse_args(argv)
    rows = []
    hdr = f"{'topology':<14} {'nodes':>6} {'steps':>6} {'bound':>6} {'valid':>5} " \
          f"{'transfers':>10} {'plan s':>8} {'plan cpu':>8} {'valid. s':>8} {'val. cpu':>8} " \
          f"{'total s':>8} {'cpu s':>8} {'peak MiB':>9} {'numba load s':>12}"
    if args.json != "-":
        print(hdr)
    for side in args.sides:
        spec = f"torus:{side}x{side}{args.options}"
        cap = int(args.cap_gib * 2**30)
        if cap and (args.engine == "numba" or args.whole) and _estimated_peak(side**2) > cap:
            rows.append({"topology": spec, "skipped": f"estimated peak "
                         f"{_estimated_peak(side**2) / 2**30:.1f} GiB > cap {args.cap_gib} GiB"})
            if args.json != "-":
                print(f"{spec:<14} skipped: {rows[-1]['skipped']}", flush=True)
            continue
        child = [CHILD] if args.engine == "numba" else [TRANSLATED]
        out = subprocess.run([sys.executable, "-c", *child, spec, args.algorithm,
                              str(cap + 2**31 if cap else 0),  # + numba's address space
                              "1" if args.whole else "0"],
                             capture_output=True, text=True)
        if out.returncode:
            print(out.stderr, file=sys.stderr)
            return 1
        r = json.loads(out.stdout.strip().splitlines()[-1])
        rows.append(r)
        if args.json != "-":
            print(f"{spec:<14} {r['nodes']:>6} {r['steps_per_phase'][0]:>6} {r['lower_bound']:>6} "
                  f"{str(r['valid']):>5} {r['transfers']:>10} {r['plan_s']:>8.3f} "
                  f"{r['plan_cpu_s']:>8.3f} {r['validate_s']:>8.3f} {r['validate_cpu_s']:>8.3f} "
                  f"{r['plan_validate_s']:>8.3f} {r['plan_validate_cpu_s']:>8.3f} "
                  f"{r['peak_rss_mib']:>9.0f} "
                  f"{r['numba_load_s']:>12.2f}", flush=True)
            extra = {k: r[k] for k in r if k.startswith(("whole", "part"))}
            if extra:
                print(f"{'':<14} " + " ".join(f"{k}={v:.4g}" if isinstance(v, float)
                                               else f"{k}={v}" for k, v in extra.items()),
                      flush=True)
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
