"""Predicted allreduce times: replay a schedule on a model of its network.

A consumer of :mod:`mtcoll.topology` and :class:`~mtcoll.Schedule`; the executor never
imports it. The model (documented in full in ``docs/reproduction.md``):

* **Bytes.** The buffer holds ``nbytes // itemsize`` elements (``itemsize`` 4: float32
  gradients); :meth:`Schedule.chunk_bounds` cuts them into chunks, and a transfer of chunks
  ``[lo, hi)`` carries their elements times ``itemsize`` bytes.
* **Time of one transfer.** Released when what it waits for is done (below), it spends
  ``overhead + sum over its route's links of (link latency + router_delay)`` in flight without
  using bandwidth, then drains its bytes through every link of its route at the rate a max-min
  fair share of those links gives it (transfers crossing one link at the same time share it).
  Alone on a route of ``h`` links it takes ``overhead + h * (latency + router_delay) +
  bytes / bandwidth``.
* **mode="step"**: step-synchronous, the paper's strict schedule. Every transfer of a step is
  released when the slowest transfer of the step before has completed; the gather phase
  follows the reduce phase.
* **mode="dataflow"**: a transfer is released as soon as its sender holds its data: when every
  transfer the sender received earlier in (phase, step) order whose chunks overlap it has
  completed (the validator's dependency rule: a reduce-phase send waits for the sender's
  earlier reduce-receives of those chunks; a gather-phase send waits for the receive of the
  chunk, or, at the chunk's owner, for the owner's reduce-receives, i.e. the end of its
  reduction). Transfers of different steps may then overlap and share links.
* **sharing="fair"** (default): transfers on a link share it max-min fairly.
  **sharing="priority"**: the paper's step-priority arbitration; a transfer of an earlier
  (phase, step) takes what it can use before any later one gets the rest, and transfers of
  one step share fairly. The same as fair in step mode, where only one step runs at a time.
  **sharing="connection"**: what TCP does with the messages of a pair of ranks: each
  (sender, receiver) pair's transfers go one at a time on its own connection, in the order
  their in-flight delay ended (the order the executor posts them: whichever has its data
  first; ties in schedule order, i.e. earlier steps first), a transfer waiting in its
  connection's queue until the one before it has completed; the connections' current
  transfers share links max-min fairly.
* **burst** (bytes, default 0): each link is also a token bucket of that depth, as a Linux
  ``tbf`` shaper is: while the link carries nothing its tokens refill at its bandwidth, up to
  ``burst``, and a transfer that starts on it gets as many bytes as the emptiest bucket of its
  route holds delivered at once (the rest drains at the fair rate). 0: plain links.

Defaults: the topology's links (16 GB/s per direction and 150 ns per link unless the spec was
parsed otherwise), :data:`ROUTER_DELAY` per hop and :data:`OVERHEAD` per message.

>>> from mtcoll.simulate import simulate
>>> from mtcoll.plan import plan
>>> r = simulate(plan("torus:4x4", "multitree"), "torus:4x4", 1 << 20)
>>> round(r.time * 1e6, 1)   # microseconds: 10 steps of 64 KiB at 16 GB/s, plus latencies
42.6
"""

from __future__ import annotations

import math
import re
import time as _time
from dataclasses import dataclass, field

import numpy as np

from ..schedule import REDUCE, Schedule
from ..topology import parse
from ..plan._graph import route_ids
from ._flatten import (ITEMSIZE, OVERHEAD, ROUTER_DELAY, element_bounds, route_table,
                       step_index, transfer_bytes)

__all__ = ["simulate", "Result", "sweep", "parse_sizes", "busbw", "ceiling",
           "MODES", "SHARINGS", "STEPS_FROM", "ROUTER_DELAY", "OVERHEAD", "ITEMSIZE",
           "simgrid_python", "simgrid_replay"]

MODES = ("step", "dataflow")
SHARINGS = ("fair", "priority", "connection")
#: ``engine="auto"`` replays step-synchronous, fair-sharing runs of schedules of fewer
#: transfers in Python: there the pure-Python engine takes well under a second, while compiling
#: the kernel on a fresh machine takes about 7 s (torus:4x4 has 480 transfers, torus:8x8 8,064;
#: docs/performance.md). Dataflow and priority replays always take the kernel: there the Python
#: engine's cost grows much faster (3,000 pieces, dataflow with priority: over 10 minutes).
NUMBA_FROM = 4096
#: ``engine="auto"`` replays step-synchronous, fair-sharing runs without bursts of schedules of
#: this many transfers or more step by step (:mod:`mtcoll.simulate._steps`): the same times,
#: without the event engine's per-transfer arrays (torus:64x64: 33.5 M transfers, which the
#: event engine's inputs alone would take 2.3 GB for)
STEPS_FROM = 1 << 20


@dataclass
class Result:
    """A simulated allreduce.

    Attributes
    ----------
    time : float
        Predicted allreduce time in seconds (the last transfer's completion).
    reduce_time : float
        When the last reduce-phase transfer completed (in step mode, where the gather phase
        starts); ``time - reduce_time`` is the rest.
    step_times : ndarray or None
        Step mode: the duration of each step, reduce steps then gather steps (they sum to
        ``time``). None in dataflow mode.
    slowed : int
        Transfers that shared a link at some moment (rate below their route's narrowest link).
    busiest_link_time : float
        Bytes carried by the busiest link over its bandwidth: no replay of this schedule on
        this network can be faster.
    release, start, finish : ndarray or None
        Per transfer (in schedule order): when it could go, when its bytes began to flow, when
        it completed (None when :func:`simulate` was asked ``per_transfer=False``).
    nbytes, mode, sharing, nranks, params
        The inputs, and the model parameters used.
    """

    time: float
    reduce_time: float
    step_times: np.ndarray | None
    slowed: int
    busiest_link_time: float
    release: np.ndarray = field(repr=False)
    start: np.ndarray = field(repr=False)
    finish: np.ndarray = field(repr=False)
    nbytes: int = 0
    mode: str = "step"
    sharing: str = "fair"
    nranks: int = 1
    params: dict = field(default_factory=dict)

    @property
    def algbw(self):
        """Bytes per second of the allreduce: nbytes / time (nccl-tests' algbw)."""
        return self.nbytes / self.time if self.time > 0 else math.inf

    @property
    def busbw(self):
        """algbw * 2(N-1)/N (nccl-tests' bus bandwidth for allreduce)."""
        return busbw(self.nbytes, self.time, self.nranks)


def busbw(nbytes, seconds, nranks):
    """nccl-tests' allreduce bus bandwidth: nbytes / seconds * 2(N-1)/N."""
    if seconds <= 0:
        return math.inf
    return nbytes / seconds * 2 * (nranks - 1) / max(nranks, 1)


def ceiling(schedule):
    """The speedup over ring a schedule of ``T`` steps per phase can reach on ``N`` ranks when
    every step costs the same: (N - 1) / T, using the costlier phase's
    :meth:`Schedule.step_cost`."""
    cost = max(schedule.step_cost())
    return (schedule.nranks - 1) / cost if cost > 0 else math.inf


def _task_graph(schedule, topo, nbytes, mode, itemsize=ITEMSIZE, router_delay=ROUTER_DELAY,
               overhead=OVERHEAD, engine="numba"):
    """The replay's input arrays for a schedule: (size, delay, rptr, rlinks, cap, before,
    after, ntasks). Transfers are tasks 0..T-1 in schedule order; step mode adds one zero-time
    barrier task per step boundary."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {', '.join(MODES)}, got {mode!r}")
    t = schedule.ntransfers
    size = transfer_bytes(schedule, nbytes, itemsize)
    rptr, rlinks = route_table(schedule, topo)
    hops = np.diff(rptr)
    cum = np.concatenate(([0.0], np.cumsum(topo.latency[rlinks])))
    lat = cum[rptr[1:]] - cum[rptr[:-1]]
    delay = overhead + lat + hops * router_delay
    if mode == "dataflow":
        from ._replay import dataflow_deps

        fn = dataflow_deps if engine == "numba" else dataflow_deps.py_func
        before, after = fn(schedule.phase, schedule.step, schedule.src, schedule.dst,
                                      schedule.lo, schedule.hi, schedule.nranks, schedule.nchunks)
        ntasks = t
    else:
        k, nsteps = step_index(schedule)
        # barrier b (task t + b - 1) closes ordinal step b - 1 and opens step b
        into = k < nsteps - 1
        before = np.concatenate((np.flatnonzero(into), t + k[k > 0] - 1))
        after = np.concatenate((t + k[into], np.flatnonzero(k > 0)))
        ntasks = t + nsteps - 1
        size = np.concatenate((size, np.zeros(nsteps - 1)))
        delay = np.concatenate((delay, np.zeros(nsteps - 1)))
        rptr = np.concatenate((rptr, np.full(nsteps - 1, rptr[-1])))
    return size, delay, rptr, rlinks, topo.bandwidth.astype(np.float64), before, after, ntasks


def _dependents(before, after, ntasks):
    order = np.argsort(before, kind="stable")
    dptr = np.concatenate(([0], np.cumsum(np.bincount(before, minlength=ntasks))))
    ndeps = np.bincount(after, minlength=ntasks).astype(np.int64)
    return dptr.astype(np.int64), after[order].astype(np.int64), ndeps


# -- the API -------------------------------------------------------------------------------------

def simulate(schedule, topology=None, nbytes=1 << 20, mode="step", *, sharing="fair",
             itemsize=ITEMSIZE, bandwidth=None, latency=None, router_delay=ROUTER_DELAY,
             overhead=OVERHEAD, burst=0.0, engine="auto", per_transfer=True):
    """Predict the time of an allreduce of ``nbytes`` bytes running ``schedule``.

    Parameters
    ----------
    schedule : Schedule
        Any schedule (it need not be valid or contention-free: transfers that meet on a link
        share it).
    topology : str or Topology, optional
        The network (default: the spec the schedule was planned on). Its links' bandwidths and
        latencies are used unless overridden.
    nbytes : int
        Bytes of the buffer; a multiple of ``itemsize``.
    mode : {"step", "dataflow"}
        Step-synchronous replay, or each transfer as soon as its data is ready (see the module
        docstring).
    sharing : {"fair", "priority", "connection"}
        How transfers on one link share it: max-min fairly, earlier steps first, or one
        pair's transfers one at a time in release order on its connection and the connections
        fairly (see the module docstring).
    itemsize : int
        Bytes per element: the buffer has ``nbytes // itemsize`` elements, cut into chunks by
        :meth:`Schedule.chunk_bounds`.
    bandwidth, latency : float, optional
        Override every link's bandwidth (bytes/s) and latency (s).
    router_delay : float
        Seconds per hop (per link crossed) on top of the link latency.
    overhead : float
        Seconds per message, once per transfer.
    burst : float
        Bytes each link lets through at once after idling (a token bucket; see the module
        docstring). 0: none.
    engine : {"auto", "numba", "python", "steps"}
        The compiled event engine, or its pure-Python twin (identical results), or (step mode,
        fair sharing, no burst) the step-by-step replay, which runs the event engine only on
        a step where transfers share a link (the same times up to rounding); ``auto`` takes
        Python for step mode with fair sharing below :data:`NUMBA_FROM` transfers, where it is
        quicker than compiling, ``steps`` where that replay applies from :data:`STEPS_FROM`
        transfers, and the kernel otherwise.
    per_transfer : bool
        Keep each transfer's release, start and finish in the result (24 bytes a transfer);
        False leaves them None.

    Returns
    -------
    Result

    Raises
    ------
    ValueError
        A bad mode, size or engine; a schedule whose size differs from the topology's; a
        transfer whose route index the topology does not have.
    """
    if not isinstance(schedule, Schedule):
        raise TypeError(f"schedule must be a Schedule, got {type(schedule).__name__}")
    topo = parse(schedule.topology if topology is None else topology, nranks=schedule.nranks)
    if bandwidth is not None or latency is not None:
        topo = topo.with_links(bandwidth, latency)
    if engine == "auto":
        small = mode == "step" and sharing == "fair" and schedule.ntransfers < NUMBA_FROM
        stepwise = mode == "step" and sharing == "fair" and not burst \
            and schedule.ntransfers >= STEPS_FROM
        engine = "python" if small else "steps" if stepwise else "numba"
    if engine not in ("numba", "python", "steps"):
        raise ValueError(f"engine must be 'auto', 'numba', 'python' or 'steps', got {engine!r}")
    if engine == "steps" and (mode != "step" or sharing != "fair" or burst):
        raise ValueError("engine 'steps' replays mode='step', sharing='fair' without burst")
    if sharing not in SHARINGS:
        raise ValueError(f"sharing must be one of {', '.join(SHARINGS)}, got {sharing!r}")
    if not burst >= 0:
        raise ValueError(f"burst must be a non-negative number of bytes, got {burst!r}")
    params = dict(itemsize=int(itemsize), router_delay=float(router_delay),
                  overhead=float(overhead), burst=float(burst),
                  bandwidth=_uniform(topo.bandwidth), latency=_uniform(topo.latency))
    t = schedule.ntransfers
    if t == 0:
        return Result(0.0, 0.0, np.zeros(0) if mode == "step" else None, 0, 0.0,
                      np.zeros(0), np.zeros(0), np.zeros(0), int(nbytes), mode, sharing,
                      schedule.nranks, params)
    if engine == "steps":
        return _simulate_steps(schedule, topo, nbytes, itemsize, router_delay, overhead,
                               per_transfer, params)
    size, delay, rptr, rlinks, cap, before, after, ntasks = _task_graph(
        schedule, topo, nbytes, mode, itemsize, router_delay, overhead, engine)
    dptr, dlist, ndeps = _dependents(before, after, ntasks)
    prio = np.zeros(ntasks, np.int64)
    if sharing == "priority":
        prio[:t] = step_index(schedule)[0]
    conn = np.full(ntasks, -1, np.int64)
    if sharing == "connection":
        conn[:t] = schedule.src.astype(np.int64) * schedule.nranks + schedule.dst
    from . import _replay as _engine

    fn = _engine.replay if engine == "numba" else _engine.replay_py
    release, start, finish, slowed, ndone = fn(size, delay, rptr, rlinks, cap, dptr, dlist, ndeps,
                                               prio, conn, np.full(len(cap), float(burst)))
    if ndone != ntasks:
        raise RuntimeError(f"replay stalled: {ntasks - ndone} of {ntasks} tasks never ran "
                           "(a dependency cycle)")
    fin = finish[:t]
    total = float(fin.max())
    red = schedule.phase == REDUCE
    reduce_time = float(fin[red].max()) if red.any() else 0.0
    step_times = None
    if mode == "step":
        k, nsteps = step_index(schedule)
        ends = np.full(nsteps, -np.inf)
        np.maximum.at(ends, k, fin)
        step_times = np.diff(np.concatenate(([0.0], ends)))
    load = np.zeros(topo.nlinks)
    np.add.at(load, rlinks, np.repeat(size[:t], np.diff(rptr[:t + 1])))
    if not per_transfer:
        release = start = fin = None
    else:
        release, start = release[:t], start[:t]
    return Result(total, reduce_time, step_times, int(slowed[:t].sum()),
                  float((load / topo.bandwidth).max()), release, start, fin,
                  int(nbytes), mode, sharing, schedule.nranks, params)


def _simulate_steps(schedule, topo, nbytes, itemsize, router_delay, overhead, per_transfer,
                    params):
    # step mode one step at a time (mtcoll/simulate/_steps.py): contention-free steps in
    # closed form, the others replayed alone by the event engine
    from ._steps import scan

    s, t = schedule, schedule.ntransfers
    bounds = element_bounds(s, nbytes, itemsize)
    q, rl_ptr, rl = route_ids(s, topo)
    rl_ptr, rl = np.asarray(rl_ptr, np.int64), np.asarray(rl, np.int64)
    cap = topo.bandwidth.astype(np.float64)
    rel_start, rel_finish = (np.empty(t), np.empty(t)) if per_transfer else \
        (np.empty(0), np.empty(0))
    first, dur, contended, load = scan(s.phase, s.step, s.lo, s.hi, bounds, int(itemsize), q,
                                       rl_ptr, rl, topo.latency.astype(np.float64), cap,
                                       float(overhead), float(router_delay), rel_start,
                                       rel_finish)
    slowed = 0
    for k in np.flatnonzero(contended).tolist():
        a, b = int(first[k]), int(first[k + 1])
        start, finish, n_slowed = _replay_alone(s, a, b, bounds, itemsize, q, rl_ptr, rl, topo,
                                                cap, router_delay, overhead)
        dur[k] = finish.max()
        slowed += n_slowed
        if per_transfer:
            rel_start[a:b], rel_finish[a:b] = start, finish
    ends = np.cumsum(dur)
    nred = int(np.count_nonzero(s.phase[first[:-1]] == REDUCE))
    release = start = finish = None
    if per_transfer:
        release = np.repeat(ends - dur, np.diff(first))
        start, finish = release + rel_start, release + rel_finish
    return Result(float(ends[-1]), float(ends[nred - 1]) if nred else 0.0, dur, slowed,
                  float((load / topo.bandwidth).max()), release, start, finish, int(nbytes),
                  "step", "fair", s.nranks, params)


def _replay_alone(s, a, b, bounds, itemsize, q, rl_ptr, rl, topo, cap, router_delay, overhead):
    # transfers a..b-1 (one step) released together with nothing else running: the event
    # engine's (start, finish, slowed) for them, times from their release
    from ._replay import replay

    size = ((bounds[s.hi[a:b]] - bounds[s.lo[a:b]]) * int(itemsize)).astype(np.float64)
    qs = q[a:b]
    lens = rl_ptr[qs + 1] - rl_ptr[qs]
    rptr = np.concatenate(([0], np.cumsum(lens)))
    rlinks = rl[np.repeat(rl_ptr[qs] - rptr[:-1], lens) + np.arange(rptr[-1])]
    cum = np.concatenate(([0.0], np.cumsum(topo.latency[rlinks])))
    delay = overhead + (cum[rptr[1:]] - cum[rptr[:-1]]) + lens * router_delay
    n = b - a
    _, start, finish, slowed, ndone = replay(
        size, delay, rptr.astype(np.int64), rlinks.astype(np.int64), cap,
        np.zeros(n + 1, np.int64), np.zeros(0, np.int64), np.zeros(n, np.int64),
        np.zeros(n, np.int64), np.full(n, -1, np.int64), np.zeros(len(cap)))
    if ndone != n:
        raise RuntimeError(f"replay of one step stalled: {n - ndone} of {n} transfers")
    return start, finish, int(slowed.sum())


def _uniform(a):
    return float(a[0]) if len(a) and (a == a[0]).all() else [float(x) for x in a]


# -- sweeps (what the CLI prints) ----------------------------------------------------------------

_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30}


def _size(text):
    m = re.fullmatch(r"\s*([0-9]+)\s*([KMG]?)(?:I?B)?\s*", text.upper())
    if not m:
        raise ValueError(f"bad size {text!r}: use a number of bytes with an optional K, M or G "
                         "suffix (KiB, MiB, GiB)")
    return int(m.group(1)) * _UNITS[m.group(2)]


def parse_sizes(text):
    """Sizes in bytes from ``A:B`` (the powers of two from A to B) or a comma list; K, M and G
    mean KiB, MiB and GiB. ``"32K:64M"``, ``"1M,3M,8M"``."""
    text = str(text).strip()
    if ":" in text:
        a, _, b = text.partition(":")
        lo, hi = _size(a), _size(b)
        if lo < 1 or hi < lo:
            raise ValueError(f"bad size range {text!r}: need 0 < A <= B")
        out, s = [], 1 << max(lo - 1, 0).bit_length()
        while s <= hi:
            out.append(s)
            s <<= 1
        if not out:
            raise ValueError(f"no power of two between {lo} and {hi}")
        return out
    out = [_size(x) for x in text.split(",") if x.strip()]
    if not out:
        raise ValueError(f"no sizes in {text!r}")
    return out


def sweep(topology, algorithms, sizes, mode="step", ports=None, per_node=False, log=None,
          **params):
    """Plan each algorithm on ``topology`` and simulate it at each size (``native``: the model
    of the MPI library's own allreduce, :mod:`mtcoll.simulate._native`).

    Returns ``(records, notes)``: one dict per (algorithm, size) with ``algorithm``, ``bytes``,
    ``time_s``, ``algbw_GBps``, ``busbw_GBps``, ``speedup_vs_ring`` (ring is always simulated
    as the reference), the schedule's steps and ceiling, the network's lower bound
    (``bound_s``, :func:`mtcoll.plan.allreduce_bound`) and ``time_over_bound``, and a few model
    facts; ``notes`` says
    which algorithms were skipped and why. With ``per_node``, each size is per rank and the
    buffer is ``size * nranks``.
    """
    from ..plan import plan
    from ..plan._bound import allreduce_bound

    topo = parse(topology, ports=ports)
    n = topo.nranks
    itemsize = params.get("itemsize", ITEMSIZE)
    sizes = [int(size) * (n if per_node else 1) for size in sizes]
    sizes = [nbytes - nbytes % itemsize for nbytes in sizes]
    # one algorithm at a time, its schedule dropped before the next is planned: on
    # torus:64x64 each holds 33.5 M transfers (737 MB)
    facts, runs, notes = {}, {}, []
    for a in dict.fromkeys(list(algorithms) + ["ring"]):
        if a == "native":
            plan_cpu = 0.0  # the MPI library's algorithm depends on the size
        else:
            try:
                c0 = _time.process_time()
                s = plan(topo, a)
                plan_cpu = _time.process_time() - c0
            except ValueError as e:
                notes.append(f"{a} skipped on {topo.spec}: {e}")
                continue
        for nbytes in sizes:
            if a == "native":
                from ._native import native_schedule
                s = native_schedule(topo, nbytes, itemsize)
            if a == "native" or nbytes == sizes[0]:
                facts[a, nbytes] = (list(s.steps), list(s.step_cost()), ceiling(s), plan_cpu)
            else:
                facts[a, nbytes] = facts[a, sizes[0]]
            c0 = _time.process_time()
            r = simulate(s, topo, nbytes, mode, per_transfer=False, **params)
            cpu = _time.process_time() - c0
            if log:
                log(f"{topo.spec} {a} {nbytes} B: {r.time * 1e6:.2f} us ({cpu:.2f} s cpu)")
            runs[a, nbytes] = (r, cpu)
        s = None
    if mode == "step" and any(a == "timed" for a, _ in facts):
        notes.append("timed is not lock-step (a step per start time): step mode puts a barrier "
                     "at each; its time is the executor's in --mode dataflow")
    records = []
    for nbytes in sizes:
        bound = allreduce_bound(topo, nbytes)
        ring_time = runs["ring", nbytes][0].time
        ring_ceiling = facts["ring", nbytes][2]
        for a in dict.fromkeys(list(algorithms) + ["ring"]):
            if a not in algorithms or (a, nbytes) not in runs:
                continue
            r, cpu = runs[a, nbytes]
            steps, cost, ceil, plan_cpu = facts[a, nbytes]
            records.append({
                "topology": topo.spec, "nodes": n, "algorithm": a, "mode": mode,
                "bytes": nbytes, "bytes_per_node": nbytes // n if per_node else None,
                "time_s": r.time, "algbw_GBps": r.algbw / 1e9, "busbw_GBps": r.busbw / 1e9,
                "speedup_vs_ring": ring_time / r.time if r.time > 0 else math.inf,
                "reduce_time_s": r.reduce_time,
                "steps_per_phase": steps, "step_cost_per_phase": cost,
                "ceiling_vs_ring": ceil / ring_ceiling,
                "slowed_transfers": r.slowed, "busiest_link_time_s": r.busiest_link_time,
                "simulate_cpu_s": cpu, "plan_cpu_s": plan_cpu,
                **bound.as_dict(), "time_over_bound": r.time / bound.time if bound.time else None,
            })
    return records, notes


# -- SimGrid cross-check -------------------------------------------------------------------------

def simgrid_python():
    """An interpreter that can ``import simgrid`` (SimGrid's Python bindings), or None: the
    ``MTCOLL_SIMGRID_PYTHON`` environment variable, else this interpreter, else the system's
    ``/usr/bin/python3`` (Debian's ``python3-simgrid``)."""
    from ._simgrid import find_python

    return find_python()


def simgrid_replay(schedule, topology=None, nbytes=1 << 20, mode="step", **kw):
    """Replay ``schedule`` in SimGrid (in a subprocess; see :mod:`mtcoll.simulate._simgrid`)
    with the same platform and parameters as :func:`simulate`; returns a dict with ``time``
    (seconds) and, in step mode, ``step_times``. Raises RuntimeError when SimGrid cannot be
    found."""
    from ._simgrid import replay

    return replay(schedule, topology, nbytes, mode, **kw)
