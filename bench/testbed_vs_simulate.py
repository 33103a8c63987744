"""Predicted against measured: the simulator on the testbed's network, beside a benchmark run on
that testbed (docs/testbed.md).

    python bench/testbed_vs_simulate.py TESTBED.json BENCH.json [--min-size 4M] [--model step]
        [--overhead-from 16K] [--json OUT.json]
    python bench/testbed_vs_simulate.py --links ALGO SIZE CALLS TESTBED.json

TESTBED.json is what ``python -m mtcoll.testbed --json FILE`` wrote (its link rates), BENCH.json
what ``python -m mtcoll.bench --json FILE`` wrote inside it. Every algorithm of the benchmark,
``native`` included (the model of the MPI library's own allreduce, mtcoll/simulate/_native.py),
is simulated (``--model``) on the topology with each link's bandwidth set to its shaped rate
times the share of a frame that is payload (``--payload``: 1448 of the 1514 bytes tbf counts
per full TCP segment), no link latency, and printed beside its measured average time.

Each message costs a fixed time besides its bytes: the ranks (16 of them spinning on 2 cores
on the project machine) take that long to see an arrival and post what follows. With
``--overhead-from SIZE`` that cost is measured on the same benchmark run, at a size too small
for the bytes to matter (16 KiB: under 1 ms of link time per message at 20 Mbit/s): the
simulator's per-message ``overhead`` is fitted, by least squares on predicted/measured - 1,
to the rows of that size -- one value for mtcoll's executor (every mtcoll algorithm's row) and
one for the MPI library (``native``'s row) -- and then used, unchanged, for the rows compared
(the sizes from ``--min-size``, never SIZE itself). Without it the overhead is 0.

With ``--links``, TESTBED.json is a run of CALLS allreduces of SIZE bytes with algorithm ALGO
(``tests/testbed/testbed_script.py loop ALGO SIZE CALLS``): the bytes each directed link carried are
printed beside the payload the schedule sends over it (each transfer's bytes on every link of
its default route), and the forwarded bytes beside the payload that crosses a middle vertex.
"""

from __future__ import annotations

import argparse
import json
import sys

import numpy as np

from mtcoll.bench import parse_size
from mtcoll.execute import SLEEP_MAX_SEGMENTS, SLEEP_SEGMENT_BYTES
from mtcoll.simulate import simulate
from mtcoll.simulate._native import native_schedule
from mtcoll.simulate._pieces import pieces
from mtcoll.testbed._net import tbf_burst
from mtcoll.topology import parse

#: payload bytes per byte tbf counts for a full segment: MSS 1448 (1500 MTU, TCP timestamps)
#: in a 1514-byte Ethernet frame
PAYLOAD = 1448 / 1514


def predicted(topo, algorithm, nbytes, model, plans, overhead=0.0, sleep=False, burst=0.0):
    """Seconds the simulator predicts: ``model`` "step" (the schedule step by step) or
    "pieces" (the executor's pieces, dataflow, each pair's pieces in release order on its
    connection: ``sharing="connection"``) or "priority" (the same pieces, earlier steps first
    on a link)."""
    from mtcoll.plan import plan

    # the compiled engine: piece schedules are small enough for "auto" to pick the Python one,
    # which is slow on dataflow replays of thousands of pieces
    kw = dict(latency=0.0, router_delay=0.0, overhead=float(overhead), burst=float(burst),
              engine="numba")
    if algorithm == "native":
        s = native_schedule(topo, nbytes)
    else:
        if algorithm not in plans:
            plans[algorithm] = plan(topo, algorithm)
        s = plans[algorithm]
    if model == "step":
        return simulate(s, topo, nbytes, "step", **kw).time
    if algorithm != "native":  # the MPI library sends each message whole
        # the pieces of the executor's wait: ranks that sleep between tests cut larger ones
        seg = dict(segment_bytes=SLEEP_SEGMENT_BYTES, max_segments=SLEEP_MAX_SEGMENTS) \
            if sleep else {}
        s = pieces(s, nbytes, **seg)
    sharing = "priority" if model == "priority" else "connection"
    return simulate(s, topo, nbytes, "dataflow", sharing=sharing, **kw).time


def implementation(algorithm):
    """Whose code sends an algorithm's messages: ``"library"`` (native) or ``"executor"``."""
    return "library" if algorithm == "native" else "executor"


def fit_overhead(topo, rows, model, plans, sleep=False, burst=0.0, rounds=4):
    """The per-message overhead (seconds, >= 0) for which the predicted times of ``rows``
    (benchmark records: algorithm, bytes, time_avg_us) are closest to the measured ones, by
    least squares on predicted/measured - 1. The prediction is piecewise linear in the
    overhead (its slope: the messages on the critical path), so the fit is a linear least
    squares on the slopes at the current estimate, repeated ``rounds`` times."""
    meas = np.array([r["time_avg_us"] / 1e6 for r in rows])

    def pred(o):
        return np.array([predicted(topo, r["algorithm"], r["bytes"], model, plans, o, sleep,
                                   burst) for r in rows])

    p0 = pred(0.0)
    o = 0.01  # a first slope from 10 ms
    for _ in range(rounds):
        slope = (pred(o) - p0) / o
        a, b = slope / meas, 1 - p0 / meas
        new = max(float(a @ b / (a @ a)), 0.0) if (a @ a) > 0 else 0.0
        if new == 0.0 or abs(new - o) <= 1e-6 * o:
            o = new
            break
        o = new
    return o, pred(o) / meas


def link_payload(topo, algorithm, nbytes, itemsize=4):
    """Payload bytes per directed link (by link id) and forwarded per vertex of one call."""
    from mtcoll.plan import plan

    s = native_schedule(topo, nbytes, itemsize) if algorithm == "native" else plan(topo,
                                                                                   algorithm)
    bounds = s.chunk_bounds(nbytes // itemsize)
    per_link = np.zeros(topo.nlinks)
    fwd = np.zeros(topo.nvertices)
    for k in range(len(s.src)):
        nb = (bounds[s.hi[k]] - bounds[s.lo[k]]) * itemsize
        route = topo.routes(int(s.src[k]), int(s.dst[k]))[int(s.route[k])]
        for lid in route:
            per_link[lid] += nb
        for lid in route[1:]:
            fwd[int(topo.link_src[lid])] += nb
    return per_link, fwd


def links_main(algorithm, size, calls, path):
    with open(path) as f:
        tb = json.load(f)
    topo = parse(tb["meta"]["topology"])
    nbytes = parse_size(size)
    per_link, fwd = link_payload(topo, algorithm, nbytes)
    per_link *= int(calls)
    fwd *= int(calls)
    print(f"# {topo.spec}: {calls} x {algorithm} of {nbytes} B; measured (frames, from tbf) "
          f"against the schedule's payload")
    ratios = []
    for x in tb["traffic"]["links"]:
        want = per_link[topo.link(x["from"], x["to"])]
        ratios.append(x["bytes"] / want if want else float("inf") if x["bytes"] else 1.0)
    ratios = np.array(ratios)
    used = per_link > 0
    print(f"links the schedule uses: {int(used.sum())} of {topo.nlinks}; measured/payload "
          f"on them: min {ratios[np.isfinite(ratios)].min():.3f}, "
          f"max {ratios[np.isfinite(ratios)].max():.3f}")
    meas_fwd = tb["traffic"]["forwarded"]
    print(f"forwarded: schedule payload {fwd.sum() / 1e6:.2f} MB, measured "
          f"{sum(v or 0 for v in meas_fwd.values()) / 1e6:.2f} MB; per vertex measured: "
          + ", ".join(f"{k} {v / 1e6:.2f}" for k, v in meas_fwd.items()))
    return 0


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["--links"]:
        return links_main(*argv[1:5])
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("testbed_json")
    p.add_argument("bench_json")
    p.add_argument("--min-size", default="0", help="leave out smaller sizes (default: none)")
    p.add_argument("--model", default="pieces", choices=("pieces", "priority", "step"),
                   help="pieces: mtcoll's algorithms cut into the executor's pieces (256 KiB, "
                        "at most 16, as when ranks busy-wait), replayed as dataflow, each rank "
                        "pair's pieces in the order they are ready on its connection; priority: "
                        "the same with earlier steps first on a link; step: each schedule step "
                        "by step (default: %(default)s)")
    p.add_argument("--payload", type=float, default=PAYLOAD,
                   help="payload share of the shaped bytes (default: %(default).4f)")
    p.add_argument("--overhead-from", default=None, metavar="SIZE",
                   help="fit the per-message overhead (executor's and library's) to the "
                        "benchmark's rows of SIZE, and leave SIZE out of the comparison "
                        "(default: no overhead)")
    p.add_argument("--no-burst", action="store_true",
                   help="links without the testbed's tbf bucket (default: the bucket, "
                        "mtcoll.testbed's 10 ms of the rate, at least 32 KiB)")
    p.add_argument("--json", default=None, metavar="OUT.json",
                   help="also write the comparison, the fitted overheads and the inputs")
    args = p.parse_args(argv)
    with open(args.testbed_json) as f:
        tb = json.load(f)
    with open(args.bench_json) as f:
        bench = json.load(f)
    topo = parse(tb["meta"]["topology"])
    bw = np.array(topo.bandwidth, dtype=float)
    for link in tb["traffic"]["links"]:
        bw[topo.link(link["from"], link["to"])] = link["rate_Bps"] * args.payload
    shaped = object.__new__(type(topo))
    shaped.__dict__.update(topo.__dict__)
    shaped.bandwidth = bw
    low = parse_size(args.min_size)
    plans = {}
    print(f"# {topo.spec} at {tb['meta']['rate']} ({tb['meta'].get('congestion_control')}), "
          f"payload share {args.payload:.4f}, simulator model {args.model}")
    results = [r for r in bench["results"] if r["algorithm"] != "auto"]
    # MTCOLL_WAIT=sleep in the benchmark's environment: the executor's sleeping pieces
    sleep = bench["meta"].get("environment", {}).get("MTCOLL_WAIT") == "sleep"
    # the tbf bucket of the links (uniform rate), in payload bytes; --no-burst: plain links
    rates = {link["rate_Bps"] for link in tb["traffic"]["links"]}
    burst = 0.0 if args.no_burst or len(rates) != 1 else tbf_burst(rates.pop()) * args.payload
    print(f"# link burst {burst:.0f} payload bytes; executor pieces of "
          f"{'sleeping' if sleep else 'busy-waiting'} ranks")
    overhead = {"executor": 0.0, "library": 0.0}
    fit = {}
    small = None
    if args.overhead_from is not None:
        small = parse_size(args.overhead_from)
        for who in overhead:
            rows = [r for r in results if r["bytes"] == small and implementation(r["algorithm"])
                    == who]
            if not rows:
                continue
            overhead[who], ratio = fit_overhead(shaped, rows, args.model, plans, sleep, burst)
            fit[who] = {r["algorithm"]: round(float(x), 4) for r, x in zip(rows, ratio)}
            print(f"# {who} overhead per message, fitted at {small} B: "
                  f"{overhead[who] * 1e3:.2f} ms (pred/meas there: "
                  + ", ".join(f"{a} {x:.2f}" for a, x in fit[who].items()) + ")")
        if not fit:
            p.error(f"the benchmark has no rows of {small} B to fit the overhead to")
    print(f"# {'size':>10} {'algorithm':>10} {'measured(s)':>12} {'predicted(s)':>12} "
          f"{'pred/meas':>9}")
    worst = 0.0
    out = []
    for r in results:
        if r["bytes"] < low or r["bytes"] == small:
            continue
        meas = r["time_avg_us"] / 1e6
        pred = predicted(shaped, r["algorithm"], r["bytes"], args.model, plans,
                         overhead[implementation(r["algorithm"])], sleep, burst)
        worst = max(worst, abs(pred / meas - 1))
        out.append({"algorithm": r["algorithm"], "bytes": r["bytes"], "measured_s": meas,
                    "predicted_s": pred, "ratio": pred / meas})
        print(f"  {r['bytes']:>10} {r['algorithm']:>10} {meas:>12.3f} {pred:>12.3f} "
              f"{pred / meas:>9.2f}")
    print(f"# largest |pred/meas - 1|: {worst:.2f}")
    dropped = tb["traffic"].get("total_dropped_packets")
    if dropped:  # the model has no packet loss: lost packets cost retransmissions it cannot see
        print(f"# note: the testbed's tbf queues dropped {dropped} packets in this run, which "
              f"the simulator does not model; the algorithms that overflowed a queue run slower "
              f"than predicted (a longer queue, python -m mtcoll.testbed --queue 2s, drops none)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"testbed_json": args.testbed_json, "bench_json": args.bench_json,
                       "model": args.model, "payload": args.payload, "sleep_pieces": sleep,
                       "burst_bytes": burst, "min_size": low,
                       "overhead_from": small, "overhead_s": overhead, "fit": fit,
                       "rows": out, "worst": worst}, f, indent=1)
            f.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
