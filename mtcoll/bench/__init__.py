"""Allreduce benchmark: mtcoll's algorithms against the MPI library's own ``Allreduce``.

Run it as ``mpiexec -n N python -m mtcoll.bench [options]`` (see ``--help``); this module holds
the pieces, usable from Python too. It is a consumer of the public API: one
:class:`mtcoll.Comm` per algorithm, ``Comm.Allreduce`` timed side by side with ``native``.

Method (after OSU ``osu_allreduce`` and nccl-tests):

* For each size, the inputs are small integers, so that every algorithm's sum is exact and the
  results can be compared bit for bit: a reference is computed with the MPI library's
  ``Allreduce`` on the world communicator, and each algorithm's first call is checked against
  it (``#wrong`` counts differing elements over all ranks).
* Then one barrier-separated call probes the time per call (the largest over the ranks, so
  that every rank decides the same), a few untimed warm-up calls follow (up to 10 % of the time
  budget; at most :data:`MAX_WARMUP`), and ``iters`` timed calls, each between a barrier and
  the end of the call, as OSU does. ``iters`` fills ``time_per_size`` seconds, bounded by
  ``min_iters`` and :data:`MAX_ITERS` (more iterations for small sizes).
* The timed calls of one size are made in :data:`ROUNDS` rounds, each visiting every algorithm
  in turn: on a shared machine the load changes while a sweep runs, and interleaving puts such
  changes on all algorithms alike (the comparisons are side by side, not one after another).
* Each rank averages its own calls; the table gives the average, minimum and maximum of those
  averages over the ranks. ``algbw = bytes / time_avg`` and, as nccl-tests defines it for
  all-reduce, ``busbw = algbw * 2(N-1)/N`` (GB/s = 1e9 bytes/s). The JSON also gives
  ``time_median_us``, the per-rank median averaged over the ranks, which ``--tune`` uses.
"""

from __future__ import annotations

import datetime
import os
import re
import sys

import numpy as np
from mpi4py import MPI

__all__ = ["ALGORITHMS", "DEFAULT_SIZES", "DEFAULT_TIME_PER_SIZE", "MIN_ITERS", "MAX_ITERS",
           "MAX_WARMUP", "ROUNDS", "TUNE_MARGIN", "BUFFERS_PER_RANK", "parse_sizes",
           "parse_size", "format_size", "memory_cap", "run", "format_table", "tuning_table",
           "plot", "OPS"]

#: The algorithms benchmarked by default, in table order (``ring2d`` where it applies).
ALGORITHMS = ("auto", "multitree", "ring", "ring2d", "dbtree", "rhd", "native")

#: Default size sweep: 8 B, the powers of 4 in between, 64 MiB.
DEFAULT_SIZES = "8:64M"

#: Default seconds of timed calls per (algorithm, size).
DEFAULT_TIME_PER_SIZE = 0.2

#: Timed calls per (algorithm, size) at least, unless ``--iters`` says otherwise.
MIN_ITERS = 2

#: Timed calls at most: OSU's 1000 up to 8 KiB, then 100 (by message size in bytes).
MAX_ITERS = ((8 * 1024, 1000), (None, 100))

#: The timed calls of a size are made in this many rounds over the algorithms.
ROUNDS = 8

#: Untimed warm-up calls at most, after the checked first call (OSU's 100/10, scaled down).
MAX_WARMUP = ((8 * 1024, 20), (None, 2))

#: ``--tune``: an mtcoll algorithm replaces the MPI library at a size only if its median time
#: is at least this fraction below the MPI library's.
TUNE_MARGIN = 0.05

#: Buffers of the message size each rank holds: input, output and reference, plus the
#: executor scratch (reduce-phase receives) that each mtcoll algorithm keeps for reuse.
BUFFERS_PER_RANK = 3

OPS = {"sum": MPI.SUM, "prod": MPI.PROD, "min": MPI.MIN, "max": MPI.MAX, "land": MPI.LAND,
       "lor": MPI.LOR, "lxor": MPI.LXOR, "band": MPI.BAND, "bor": MPI.BOR, "bxor": MPI.BXOR}

_UNITS = {"": 1, "b": 1, "k": 1 << 10, "kb": 1 << 10, "kib": 1 << 10, "m": 1 << 20,
          "mb": 1 << 20, "mib": 1 << 20, "g": 1 << 30, "gb": 1 << 30, "gib": 1 << 30}


# -- sizes ---------------------------------------------------------------------------------------

def parse_size(text):
    """Bytes from ``"8"``, ``"64K"``, ``"4M"``, ``"1G"`` (binary units; ``KiB``/``KB`` too)."""
    m = re.fullmatch(r"\s*([0-9]+)\s*([a-zA-Z]*)\s*", str(text))
    if not m or m.group(2).lower() not in _UNITS:
        raise ValueError(f"bad size {text!r}: expected a number with an optional unit K, M or "
                         f"G (binary), e.g. 64K")
    return int(m.group(1)) * _UNITS[m.group(2).lower()]


def parse_sizes(text):
    """Message sizes in bytes from ``LO:HI[:F]`` or a comma list.

    ``LO:HI`` gives ``LO``, the powers of ``F`` (default 4) strictly between, and ``HI``:
    ``8:64M`` is 8, 16, 64, 256, ..., 16M, 64M. ``1K,64K,4M`` gives those sizes.
    """
    text = str(text).strip()
    if ":" in text:
        parts = text.split(":")
        if len(parts) not in (2, 3):
            raise ValueError(f"bad size range {text!r}: expected LO:HI or LO:HI:FACTOR")
        lo, hi = parse_size(parts[0]), parse_size(parts[1])
        factor = int(parts[2]) if len(parts) == 3 else 4
        if lo < 1 or hi < lo or factor < 2:
            raise ValueError(f"bad size range {text!r}: need 1 <= LO <= HI and FACTOR >= 2")
        sizes = {lo, hi}
        p = 1
        while p < hi:
            if p > lo:
                sizes.add(p)
            p *= factor
        return sorted(sizes)
    sizes = sorted({parse_size(t) for t in text.split(",") if t.strip()})
    if not sizes or sizes[0] < 1:
        raise ValueError(f"bad size list {text!r}: expected sizes of at least 1 byte")
    return sizes


def format_size(n):
    """``64K``, ``4M``, ``1G`` for whole binary units, else the bytes."""
    for unit, mult in (("G", 1 << 30), ("M", 1 << 20), ("K", 1 << 10)):
        if n >= mult and n % mult == 0:
            return f"{n // mult}{unit}"
    return str(n)


def mem_total():
    """MemTotal of this machine in bytes (from ``/proc/meminfo``), or None."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def memory_cap(nranks, nalgorithms, total=None):
    """Largest message size whose buffers, on all ranks together, stay under half of
    ``total`` bytes (default: MemTotal): each rank holds :data:`BUFFERS_PER_RANK` buffers plus
    one scratch buffer per mtcoll algorithm (``nalgorithms`` of them). None if unknown."""
    total = mem_total() if total is None else total
    if not total:
        return None
    per_rank = BUFFERS_PER_RANK + max(0, nalgorithms)
    return total // 2 // (nranks * per_rank)


# -- inputs --------------------------------------------------------------------------------------

def make_input(count, dtype, opname, rank):
    """This rank's input: small integers, so that sums and products are exact in any order
    and every algorithm's result can be compared bit for bit with the MPI library's."""
    i = np.arange(count, dtype=np.int64)
    i += 7 * rank
    if opname in ("land", "lor", "lxor"):
        v = (i % 3 == 0)
    elif opname == "prod":
        v = np.where(i % 61 == 0, 2, 1)  # a few factors of 2 per element at most
    elif opname in ("min", "max"):
        v = i % 97
    elif opname in ("band", "bor", "bxor"):
        v = i % 256
    else:  # sum: below 8, so that 64 ranks of float16 still add exactly
        v = i % 8
    dt = np.dtype(dtype)
    if dt.kind == "c":
        out = v.astype(dt)
        out.imag = (v % 3)
        return out
    return v.astype(dt)


def _count_wrong(got, ref):
    # element by element, in slices, so no temporary as large as the buffer
    wrong = 0
    step = 1 << 20
    for a in range(0, got.size, step):
        wrong += int(np.count_nonzero(got[a:a + step] != ref[a:a + step]))
    return wrong


# -- the measurement -----------------------------------------------------------------------------

def _bound(table, nbytes):
    for limit, value in table:
        if limit is None or nbytes <= limit:
            return value
    return table[-1][1]


def run(comm, comms, sizes, dtype="float32", opname="sum", inplace=False, iters=None,
        time_per_size=DEFAULT_TIME_PER_SIZE, min_iters=MIN_ITERS, rounds=ROUNDS,
        progress=None):
    """Time ``Allreduce`` for every (size, algorithm). Collective over ``comm``.

    Parameters
    ----------
    comm : MPI.Intracomm
        The world of the benchmark (barriers, the reference result, the statistics).
    comms : dict
        ``{algorithm name: mtcoll.Comm}`` over the same ranks, in table order.
    sizes : list of int
        Message sizes in bytes (rounded down to whole elements, at least one).
    iters : int, optional
        Timed calls per (algorithm, size); default: bounded by ``time_per_size``.
    rounds : int
        The timed calls of one size are made in this many rounds, each round visiting every
        algorithm in turn, so that a change in the machine's load during the measurement
        falls on all algorithms alike.
    progress : callable, optional
        Called with a line of text after every measurement (rank 0 prints it to stderr).

    Returns
    -------
    list of dict
        One record per (algorithm, size), with the keys of the JSON ``results``.
    """
    op = OPS[opname]
    dt = np.dtype(dtype)
    rank, n = comm.Get_rank(), comm.Get_size()
    records = []
    for size in sizes:
        count = max(1, size // dt.itemsize)
        nbytes = count * dt.itemsize
        send = make_input(count, dt, opname, rank)
        recv = np.empty_like(send)
        ref = np.empty_like(send)
        comm.Allreduce(send, ref, op)

        def call(c):
            if inplace:
                c.Allreduce(MPI.IN_PLACE, recv, op)
            else:
                c.Allreduce(send, recv, op)

        def timed(c, k, into):
            for _ in range(k):
                comm.Barrier()
                t0 = MPI.Wtime()
                call(c)
                into.append(MPI.Wtime() - t0)

        plan = {}
        for name, c in comms.items():
            # 1. the checked first call (also the first warm-up)
            recv[...] = send if inplace else 0
            call(c)
            wrong = comm.allreduce(_count_wrong(recv, ref), op=MPI.SUM)
            # 2. a probe: one call and its barrier, the longest over the ranks; it decides the
            # numbers of warm-up and timed calls, the same on every rank
            times = []
            comm.Barrier()
            t0 = MPI.Wtime()
            timed(c, 1, times)
            probe = comm.allreduce(MPI.Wtime() - t0, op=MPI.MAX)
            if iters is not None:
                nwarm, nit = 0, max(1, int(iters))
            else:
                nwarm = min(_bound(MAX_WARMUP, nbytes), int(0.1 * time_per_size / probe))
                nit = max(min_iters, min(_bound(MAX_ITERS, nbytes),
                                         int(time_per_size / probe)))
            for _ in range(nwarm):
                call(c)
            plan[name] = (wrong, nwarm + 1, nit, times)
        # 3. the timed calls, in rounds over the algorithms (the probe was the first)
        nrounds = max(1, min(int(rounds), min(p[2] for p in plan.values()) - 1))
        for r in range(nrounds):
            for name, c in comms.items():
                nit, times = plan[name][2], plan[name][3]
                k = (nit - 1) * (r + 1) // nrounds - (nit - 1) * r // nrounds
                timed(c, k, times)
        native_time = None
        mine_records = []
        for name in comms:
            wrong, nwarm, _, times = plan[name]
            mine = float(np.mean(times))
            tmin = comm.allreduce(mine, op=MPI.MIN)
            tmax = comm.allreduce(mine, op=MPI.MAX)
            tavg = comm.allreduce(mine, op=MPI.SUM) / n
            tmed = comm.allreduce(float(np.median(times)), op=MPI.SUM) / n
            algbw = nbytes / tavg / 1e9
            rec = {
                "algorithm": name, "bytes": nbytes, "count": count, "dtype": dt.name,
                "op": opname, "inplace": bool(inplace), "iters": len(times), "warmup": nwarm,
                "time_avg_us": tavg * 1e6, "time_min_us": tmin * 1e6, "time_max_us": tmax * 1e6,
                "time_median_us": tmed * 1e6,
                "algbw_GBps": algbw, "busbw_GBps": algbw * 2 * (n - 1) / n if n > 1 else 0.0,
                "wrong": int(wrong),
            }
            mine_records.append(rec)
            if name == "native":
                native_time = tavg
            if progress is not None:
                progress(f"{format_size(nbytes):>6} {name:<10} {len(times):5d} iters "
                         f"{tavg * 1e6:12.1f} us  #wrong {wrong}")
        if native_time is not None:
            for rec in mine_records:
                rec["speedup_vs_native"] = native_time / (rec["time_avg_us"] / 1e6)
        records += mine_records
        send = recv = ref = None  # free this size's buffers before the next size's
    return records


# -- output --------------------------------------------------------------------------------------

def header_lines(meta):
    """The ``#`` lines above the table."""
    steps = meta.get("multitree_steps")
    lines = [
        f"# mtcoll.bench allreduce, mtcoll {meta['versions'].get('mtcoll', '?')}, {meta['date']}",
        f"# MPI: {meta['mpi_library']} (MPI {meta['mpi_version']})",
        f"# ranks {meta['nranks']}, topology {meta['topology']}, ports {meta['ports']}, "
        f"MultiTree steps per phase {tuple(steps) if steps else 'n/a'}",
        f"# {meta['dtype']} {meta['op']}, {'in-place' if meta['inplace'] else 'out-of-place'}, "
        + (f"{meta['iters']} iterations" if meta.get("iters")
           else f"{meta['time_per_size']} s per size and algorithm, {meta['min_iters']} "
                f"iterations or more"),
    ]
    if meta.get("tuning"):
        lines.append(f"# auto: tuning table {meta['tuning']}")
    for k, v in sorted(meta.get("environment", {}).items()):
        lines.append(f"# {k}={v}")
    return lines


_COLUMNS = (("size", 10), ("count", 10), ("type", 8), ("algorithm", 10), ("time", 11),
            ("min", 11), ("max", 11), ("algbw", 8), ("busbw", 8), ("#wrong", 7),
            ("vs native", 9))


def format_table(meta, records):
    """The result table (text, one line per record, nccl-tests/OSU style)."""
    out = header_lines(meta)
    out.append("#")
    names = [f"{name:>{w}}" for name, w in _COLUMNS]
    units = ["(B)", "(elements)", "", "", "avg (us)", "(us)", "(us)", "(GB/s)", "(GB/s)", "",
             "(x)"]
    out.append("# " + " ".join(names)[2:])
    out.append("# " + " ".join(f"{u:>{w}}" for u, (_, w) in zip(units, _COLUMNS))[2:])
    last = None
    for r in records:
        if last is not None and r["bytes"] != last:
            out.append("")
        last = r["bytes"]
        sp = r.get("speedup_vs_native")
        cells = [f"{r['bytes']:>10d}", f"{r['count']:>10d}", f"{r['dtype']:>8}",
                 f"{r['algorithm']:>10}", f"{r['time_avg_us']:>11.1f}",
                 f"{r['time_min_us']:>11.1f}", f"{r['time_max_us']:>11.1f}",
                 f"{r['algbw_GBps']:>8.4f}", f"{r['busbw_GBps']:>8.4f}", f"{r['wrong']:>7d}",
                 f"{sp:>9.2f}" if sp is not None else f"{'-':>9}"]
        out.append(" ".join(cells))
    wrong = sum(r["wrong"] for r in records)
    out.append("#")
    out.append(f"# {len(records)} measurements, #wrong total {wrong}")
    return "\n".join(out) + "\n"


def _typical(r):
    return r.get("time_median_us", r["time_avg_us"])


def tuning_table(meta, records, margin=TUNE_MARGIN):
    """The tuning-table entry (see :mod:`mtcoll._tuning`) for these measurements.

    Per size, the algorithm with the lowest median time (``time_median_us``: a call held up
    by the machine's other work moves a mean, not a median), ``auto`` and any algorithm with
    a wrong result left out. The MPI library keeps a size unless the winner beats it by
    ``margin`` (a fraction): within the noise, ``auto`` should do what the MPI library does.
    """
    best, native = {}, {}
    for r in records:
        if r["algorithm"] == "auto" or r["wrong"]:
            continue
        if r["algorithm"] == "native":
            native[r["bytes"]] = r
        cur = best.get(r["bytes"])
        if cur is None or _typical(r) < _typical(cur):
            best[r["bytes"]] = r
    for b, r in best.items():
        nat = native.get(b)
        if nat is not None and _typical(r) > (1 - margin) * _typical(nat):
            best[b] = nat
    if not best:
        raise ValueError("no measurement to tune from (only 'auto', or every result wrong)")
    from .._tuning import rules_from_winners

    winners = sorted((b, r["algorithm"]) for b, r in best.items())
    return {
        "nranks": meta["nranks"], "topology": meta["topology"],
        "rules": rules_from_winners(winners),
        "measured": {"date": meta["date"], "mpi_library": meta["mpi_library"],
                     "dtype": meta["dtype"], "op": meta["op"], "inplace": meta["inplace"],
                     "margin": margin,
                     "winners": [{"bytes": b, "algorithm": a,
                                  "time_median_us": round(_typical(best[b]), 3)}
                                 for b, a in winners]},
    }


def plot(path, meta, records):
    """busbw against message size, one line per algorithm, log axes (needs matplotlib)."""
    from .._cli import pyplot
    plt = pyplot("--plot")
    fig, ax = plt.subplots(figsize=(7, 4.5))
    names = list(dict.fromkeys(r["algorithm"] for r in records))
    for name in names:
        rs = [r for r in records if r["algorithm"] == name and r["busbw_GBps"] > 0]
        ax.plot([r["bytes"] for r in rs], [r["busbw_GBps"] for r in rs], marker="o",
                markersize=3, label=name, linestyle="--" if name == "native" else "-")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("message size (bytes)")
    ax.set_ylabel("busbw (GB/s)")
    ax.set_title(f"allreduce, {meta['nranks']} ranks, {meta['topology']} "
                 f"({meta['dtype']} {meta['op']})")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def meta_for(comm, mcomm, args_meta):
    """The ``meta`` object of the JSON output (collective: asks for the MultiTree schedule)."""
    from importlib import metadata

    versions = {"python": sys.version.split()[0]}
    for dist in ("mtcoll", "mpi4py", "numpy", "mpich"):
        try:
            versions[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            pass
    try:
        steps = list(mcomm.schedule("multitree").steps)
    except ValueError:
        steps = None
    topo = mcomm.network
    ports = topo.ports
    lib = " ".join(MPI.Get_library_version().strip().splitlines()[0].split())
    env = {k: v for k, v in os.environ.items()
           if k.startswith(("MTCOLL_", "MPIR_CVAR_"))}
    meta = {
        "benchmark": "allreduce",
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "host": os.uname().nodename, "cpus": os.cpu_count(),
        "mpi_library": lib, "mpi_version": "{}.{}".format(*MPI.Get_version()),
        "nranks": comm.Get_size(), "topology": topo.spec,
        "ports": int(ports[0]) if (ports == ports[0]).all() else ports.tolist(),
        "multitree_steps": steps, "versions": versions, "environment": env,
        "tuning": mcomm.tuning_path,
        # what measure_links found (MTCOLL_MEASURE_LINKS=1): the spec measured from, the
        # overrides, every link's rate, the seconds it took
        "measured_links": None if mcomm.measured_links is None else
        mcomm.measured_links.as_dict(),
    }
    meta.update(args_meta)
    return meta

