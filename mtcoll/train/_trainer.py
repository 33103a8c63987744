"""The training loop: data order, process layout, placement, epochs, evaluation, measurement.

:func:`run` is collective over ``comm`` (``stages * replicas`` processes); :func:`run_sequential`
is the one-process reference that every schedule is checked against (with ``delay``, the
reference of the asynchronous schedules' arithmetic).
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field

import numpy as np
from mpi4py import MPI

import mtcoll

from . import _data, _mlp
from ._executor import MAX_LAYERS, EmulatedCompute, Placement, RealCompute, Runner
from .pipeline import get_profile, simulate, weight_version, window_bounds

SCHEDULES = ("sequential", "gpipe", "1f1b", "pipedream", "layerpipe")
SYNCHRONOUS = ("gpipe", "1f1b")
COMPUTE = ("real", "emulate")
COMMS = ("mtcoll", "mpi4py")


@dataclass
class Config:
    schedule: str = "layerpipe"
    stages: int = 2
    replicas: int = 1
    compute: str = "real"           # real: the numpy MLP; emulate: the profile's times, asleep
    data: str = "digits"
    depth: int = _mlp.DEFAULT_DEPTH
    width: int = _mlp.DEFAULT_WIDTH
    hidden: list = field(default=None)      # hidden widths, one per layer; overrides depth/width
    activation: str = "relu"
    epochs: int = 15
    batch: int = 32                 # global mini-batch, split over replicas
    micro_batches: int = None       # per replica and mini-batch, gpipe/1f1b; None: 4 (real), S
    lr: float = 0.02
    momentum: float = 0.9
    seed: int = 0
    algorithm: str = "auto"         # the gradient allreduce: calibrated on the dp communicator
    comm: str = "mtcoll"            # the gradient allreduce: mtcoll.Comm, or plain mpi4py
    bucket_bytes: int = 1 << 16
    partition: list = field(default=None)   # first layer of each stage; None: the model's choice
    profile: str = "vgg16"          # emulate: the cost profile (vgg16, uniform:L)
    seconds: float = 3e-11          # emulate: seconds per unit of the profile's cost
    elements: float = 1e-3          # emulate: message elements per tensor element
    batches: int = None             # emulate: mini-batches of the run (None: the model's 16*S+32)
    costs: object = None            # real: a Profile that places the tasks (None: measured)
    moves: tuple = None             # layerpipe: (stage of every W, of every Bew); None: model's

    @property
    def sizes_hidden(self):
        return list(self.hidden) if self.hidden else [self.width] * self.depth

    @property
    def m(self):
        """Micro-batches per mini-batch (1 for the asynchronous schedules)."""
        if self.schedule not in SYNCHRONOUS:
            return 1
        if self.micro_batches is not None:
            return self.micro_batches
        # emulated: M = S, so that a micro-batch's task is long against the ~1 ms that a
        # sleeping rank may oversleep on a loaded machine (docs/training.md)
        return self.stages if self.compute == "emulate" else 4

    def check(self):
        """Raise ValueError naming the option for a configuration that cannot run."""
        if self.schedule not in SCHEDULES:
            raise ValueError(f"unknown schedule {self.schedule!r}; choose from {', '.join(SCHEDULES)}")
        if self.comm not in COMMS:
            raise ValueError(f"--comm {self.comm!r}: choose from {', '.join(COMMS)}")
        if self.compute not in COMPUTE:
            raise ValueError(f"--compute {self.compute!r}: choose from {', '.join(COMPUTE)}")
        if self.schedule == "sequential" and (self.stages, self.replicas) != (1, 1):
            raise ValueError("schedule 'sequential' runs on one process: --stages 1 --replicas 1")
        if self.schedule == "sequential" and self.compute == "emulate":
            raise ValueError("--compute emulate needs a pipelined --schedule")
        if self.stages < 1 or self.replicas < 1:
            raise ValueError(f"--stages {self.stages} and --replicas {self.replicas} must be >= 1")
        if self.activation not in _mlp.ACTIVATIONS:
            raise ValueError(f"unknown activation {self.activation!r}")
        if self.hidden is not None and (not self.hidden or min(self.hidden) < 1):
            raise ValueError(f"--hidden {self.hidden}: positive widths, at least one")
        layers = self.layers
        if layers > MAX_LAYERS:
            raise ValueError(f"{layers} layers: at most {MAX_LAYERS} (message tags)")
        if self.stages > layers:
            what = f"--profile {self.profile}" if self.compute == "emulate" else "the MLP"
            raise ValueError(f"{what} has {layers} layers; they cannot fill "
                             f"--stages {self.stages}")
        if self.partition is not None:
            st = list(self.partition)
            if len(st) != self.stages or st[0] != 0 or st != sorted(set(st)) \
                    or st[-1] >= layers:
                raise ValueError(f"--partition {','.join(map(str, st))}: the first layer of "
                                 f"each of the {self.stages} stages, increasing from 0, "
                                 f"below {layers}")
        if self.micro_batches is not None and not 1 <= self.micro_batches <= 64:
            # message tags tell micro-batches apart modulo 128 (_executor.tag_of)
            raise ValueError(f"--micro-batches {self.micro_batches}: between 1 and 64")
        if self.compute == "emulate":
            if not self.seconds > 0 or not self.elements > 0:
                raise ValueError("--seconds and --elements must be positive")
            if self.batches is not None and self.batches < 1:
                raise ValueError(f"--batches {self.batches} must be >= 1")
            return
        per = self.batch // self.replicas
        if self.batch % self.replicas or per < 1:
            raise ValueError(f"--batch {self.batch} must be a multiple of --replicas {self.replicas}")
        if self.schedule in SYNCHRONOUS and per % self.m:
            raise ValueError(f"a replica's share of the batch ({per}) must be a multiple of "
                             f"--micro-batches {self.m}")

    @property
    def layers(self):
        if self.compute == "emulate":
            return get_profile(self.profile).layers
        return len(self.sizes_hidden) + 1


def _batches(n_train, batch, epoch, seed):
    order = np.random.default_rng([seed, epoch]).permutation(n_train)
    steps = n_train // batch   # the incomplete last mini-batch is dropped
    return [order[i * batch:(i + 1) * batch] for i in range(steps)]


def _accuracy(params, x, y, kind):
    return float((_mlp.predict(params, x, kind) == y).mean())


def _sgd_layer(w, b, velocity, gw, gb, lr, momentum):
    vw, vb = velocity
    vw = momentum * vw + gw
    vb = momentum * vb + gb
    return (w - lr * vw, b - lr * vb), (vw, vb)


def run_sequential(cfg: Config, log=None, steps=None, delay=None):
    """The reference: the whole network on one process, one update per global mini-batch.

    ``delay``: the arithmetic of the asynchronous schedules with that delay (the forward and
    backward of the epoch's mini-batch ``k`` use the weights updated through mini-batch
    ``k - delay``; see :func:`~mtcoll.train.pipeline.weight_version`); None: plain SGD.
    ``steps`` stops after that many updates (tests). Returns the result dict with ``params``.
    """
    x_tr, y_tr, x_te, y_te = _data.load(cfg.data, cfg.seed)
    sizes = [x_tr.shape[1]] + cfg.sizes_hidden + [int(y_tr.max()) + 1]
    params = _mlp.init_params(sizes, cfg.seed)
    velocity = [(np.zeros_like(w), np.zeros_like(b)) for w, b in params]
    epochs, done = [], 0
    for epoch in range(cfg.epochs):
        t0 = time.perf_counter()
        losses = []
        history = [params]       # versions of this epoch: history[v] has v updates applied
        idx_all = _batches(len(y_tr), cfg.batch, epoch, cfg.seed)
        if steps is not None:
            idx_all = idx_all[:max(0, steps - done)]
        for k, idx in enumerate(idx_all):
            used = history[weight_version(k, delay)] if delay else history[-1]
            loss, grads = _mlp.sequential_step(used, x_tr[idx], y_tr[idx], cfg.activation,
                                                 cfg.batch)
            new = []
            for i, ((w, b), (gw, gb)) in enumerate(zip(history[-1], grads)):
                p, velocity[i] = _sgd_layer(w, b, velocity[i], gw, gb, cfg.lr, cfg.momentum)
                new.append(p)
            history.append(new)
            losses.append(loss)
            done += 1
        params = history[-1]
        rec = {"epoch": epoch + 1, "loss": float(np.mean(losses)) if losses else float("nan"),
               "test_accuracy": _accuracy(params, x_te, y_te, cfg.activation),
               "seconds": time.perf_counter() - t0, "allreduce_share": 0.0,
               "pipeline_wait_share": 0.0}
        epochs.append(rec)
        if log:
            log(rec)
        if steps is not None and done >= steps:
            break
    return {"config": asdict(cfg), "partition": [0], "epochs": epochs, "params": params}


def _expand(order, schedule, nb, m):
    """A stage's task list for ``nb`` mini-batches with global micro-batch ids ``i * m + j``:
    a synchronous schedule repeats its one-mini-batch list; an asynchronous list covers all."""
    if schedule in SYNCHRONOUS:
        return [(i * m + k, kind, l) for i in range(nb) for k, kind, l in order]
    return [(k, kind, l) for k, kind, l in order if k < nb]


_PROFILES = {}


def _measured_profile(comm, sizes, rows, kind):
    """The MLP's task times, measured once per process for a shape (so that schedules run in
    one job are placed by the same profile): rank 0 times them while the other ranks sleep in
    a polled barrier (a rank spinning in MPI_Bcast would steal the core being timed)."""
    key = (tuple(sizes), rows, kind)
    if key not in _PROFILES:
        profile = None
        if comm.Get_rank() == 0:
            profile = _mlp.measure_profile(sizes=sizes, batch=rows, repeat=10, kind=kind)
        req = comm.Ibarrier()
        while not req.Test():
            time.sleep(1e-3)
        _PROFILES[key] = comm.bcast(profile, root=0)
    return _PROFILES[key]


def _plan(cfg, comm, profile, nb):
    """Rank 0 runs the schedule model for this run; every rank gets (record, orders)."""
    out = None
    if comm.Get_rank() == 0:
        try:
            rec, orders = simulate(profile, cfg.schedule, cfg.stages, micro_batches=cfg.m,
                                   batches=nb, starts=cfg.partition, moves=cfg.moves)
            out = (rec, orders)
        except ValueError as exc:
            out = exc
    out = comm.bcast(out, root=0)
    if isinstance(out, Exception):
        raise out
    return out


def _measure(comm, runner, spans, done, seconds, model, unit_seconds, S):
    """Steady-state figures of one run over the model's window (rank 0 returns them).

    Mini-batch ``i`` is done when its last task on any rank is; the period is taken over the
    middle half of the run (:func:`~mtcoll.train.pipeline.window_bounds`), busy fractions are
    the time each rank spent in tasks inside that window.
    """
    all_done = comm.gather(done, root=0)
    all_spans = comm.gather(spans, root=0)
    shares = comm.gather((runner.t_allreduce / seconds, runner.t_wait / seconds,
                          runner.t_allreduce, runner.t_wait), root=0)
    if comm.Get_rank() != 0:
        return None
    nb = len(done)
    a, b = window_bounds(nb)
    dmax = np.max(np.stack(all_done), axis=0)
    model_period = model["makespan"] * unit_seconds
    out = {"mini_batches": nb, "window": [int(a), int(b)],
           "model_mini_batches_per_s": 1.0 / model_period,
           "model_utilization": model["utilization"],
           "allreduce_share": float(np.mean([x[0] for x in shares])),
           "wait_share": float(np.mean([x[1] for x in shares])),
           # per mini-batch, averaged over ranks: seconds inside Iallreduce and Test, and
           # waiting for messages and weight versions
           "allreduce_seconds_per_batch": float(np.mean([x[2] for x in shares])) / max(nb, 1),
           "wait_seconds_per_batch": float(np.mean([x[3] for x in shares])) / max(nb, 1)}
    if b <= a:
        out.update(mini_batches_per_s=None, measured_over_model=None, stage_busy=None,
                   bubble=None)
        return out
    t_a, t_b = dmax[a], dmax[b]
    period = (t_b - t_a) / (b - a)
    busy = []
    for sp in all_spans:
        lo = np.clip(sp[:, 0], t_a, t_b)
        hi = np.clip(sp[:, 1], t_a, t_b)
        busy.append(float((hi - lo).sum() / (t_b - t_a)))
    stage_busy = [float(np.mean(busy[s::S])) for s in range(S)]
    out.update(mini_batches_per_s=1.0 / period, measured_over_model=model_period / period,
               stage_busy=stage_busy, bubble=1.0 - float(np.mean(stage_busy)))
    return out


def run(cfg: Config, comm=None, log=None, steps=None):
    """Train with ``cfg.schedule`` on ``comm`` (``stages * replicas`` processes; collective).

    Rank 0 of ``comm`` returns the result dict (``config``, ``partition``, ``placement``,
    ``model``, ``epochs`` and, with real compute, ``params``: the final weights of every
    layer); the other ranks return None. ``steps`` stops after that many mini-batches (whole
    mini-batches; the tests use it). ``log(record)`` is called on rank 0 after every epoch
    (an emulated run is one epoch of ``cfg.batches`` mini-batches).
    """
    cfg.check()
    comm = MPI.COMM_WORLD if comm is None else comm
    if cfg.schedule == "sequential":
        if comm.Get_rank() == 0:
            return run_sequential(cfg, log, steps)
        return None
    S, R = cfg.stages, cfg.replicas
    if comm.Get_size() != S * R:
        raise ValueError(f"{S} stages x {R} replicas need {S * R} processes, "
                         f"not {comm.Get_size()}")
    rank = comm.Get_rank()
    s, r = rank % S, rank // S
    emulate = cfg.compute == "emulate"
    profile, unit, real = _workload(cfg, comm)
    pipe_comm, dp_raw, dp = _communicators(cfg, comm, s, r)
    plans = {}
    runner = compute = None
    epochs, done_steps = [], 0
    result = None
    try:
        n_epochs = 1 if emulate else cfg.epochs
        for epoch in range(n_epochs):
            nb, idx_all = _epoch_batches(cfg, real, epoch, steps, done_steps)
            if nb not in plans:
                plans[nb] = _plan(cfg, comm, profile, nb)
            model, orders = plans[nb]
            if runner is None:
                runner, compute = _make_runner(cfg, model, profile, real, pipe_comm, dp, s)
            rows = widths = None
            if not emulate:
                rows, widths = _feed(cfg, real, compute, idx_all, r)
            tasks = _expand(orders[s], cfg.schedule, nb, cfg.m)
            spans, done, seconds = _timed_run(comm, runner, tasks, nb, rows, widths)
            done_steps += nb
            meas = _measure(comm, runner, spans, done, seconds, model, unit, S)
            loss = comm.reduce(compute.loss, op=MPI.SUM, root=0)
            seconds = comm.allreduce(seconds, op=MPI.MAX)
            full = None
            if not emulate:
                full = _gather_weights(rank, r, pipe_comm, runner, compute, len(real.params))
            if rank == 0:
                rec = _epoch_record(cfg, epoch, seconds, nb, loss, full, real, meas)
                epochs.append(rec)
                if log:
                    log(rec)
                result = _result(cfg, model, epochs, full)
            if steps is not None and done_steps >= steps:
                break
        return result
    finally:
        if dp is not None and dp is not dp_raw:
            dp.Free()
        dp_raw.Free()
        pipe_comm.Free()


@dataclass
class _Real:
    """What a run with real compute trains on: the data set and the initial weights."""
    x_tr: np.ndarray
    y_tr: np.ndarray
    x_te: np.ndarray
    y_te: np.ndarray
    sizes: list
    params: list


def _workload(cfg, comm):
    """(the profile that places the tasks, seconds per unit of it, the _Real data or None when
    emulated); collective, as measuring the profile is."""
    if cfg.compute == "emulate":
        return get_profile(cfg.profile), cfg.seconds, None
    x_tr, y_tr, x_te, y_te = _data.load(cfg.data, cfg.seed)
    sizes = [x_tr.shape[1]] + cfg.sizes_hidden + [int(y_tr.max()) + 1]
    params = _mlp.init_params(sizes, cfg.seed)
    rows = max(cfg.batch // cfg.replicas // cfg.m, 1)
    profile = cfg.costs or _measured_profile(comm, sizes, rows, cfg.activation)
    return profile, 1.0, _Real(x_tr, y_tr, x_te, y_te, sizes, params)


def _communicators(cfg, comm, s, r):
    """(this replica's pipeline communicator, this stage's data-parallel one, the gradient
    allreduce's communicator on it or None with one replica); run frees them."""
    pipe_comm = comm.Split(color=r, key=s)
    dp_raw = comm.Split(color=s, key=r)
    if cfg.replicas == 1:
        dp = None
    elif cfg.comm == "mpi4py":
        dp = dp_raw  # its Iallreduce and MPI.Request: the reference for mtcoll's
    else:
        dp = mtcoll.Comm(dp_raw, algorithm=cfg.algorithm)
    return pipe_comm, dp_raw, dp


def _epoch_batches(cfg, real, epoch, steps, done_steps):
    """(mini-batches in this epoch, their sample indices or None when emulated), cut short so
    that the run stops after ``steps`` mini-batches."""
    if real is None:
        return cfg.batches or 16 * cfg.stages + 32, None
    idx_all = _batches(len(real.y_tr), cfg.batch, epoch, cfg.seed)
    if steps is not None:
        idx_all = idx_all[:max(0, steps - done_steps)]
    return len(idx_all), idx_all


def _make_runner(cfg, model, profile, real, pipe_comm, dp, s):
    """(Runner, compute) of stage ``s``, placed as the first epoch's model says; made once, as
    the compute holds the stage's weights from one epoch to the next."""
    split = cfg.schedule == "layerpipe"
    place = Placement(model["stage_f"], model["stage_w"], model["stage_bew"], split)
    if real is None:
        compute = EmulatedCompute(profile, cfg.seconds, cfg.elements, profile.layers, cfg.m)
        itemsize = 4
    else:
        params = real.params
        own = {l: params[l] for l in range(len(params)) if place.f[l] == s}
        compute = RealCompute(own, cfg.activation, len(params), None, cfg.batch,
                              cfg.lr, cfg.momentum, split)
        itemsize = 8
    runner = Runner(compute, place, pipe_comm, dp, s, cfg.stages, micro_batches=cfg.m,
                    delay=cfg.stages if cfg.schedule not in SYNCHRONOUS else 1,
                    bucket_bytes=cfg.bucket_bytes, itemsize=itemsize)
    return runner, compute


def _feed(cfg, real, compute, idx_all, r):
    """Give the compute replica ``r``'s share of this epoch's samples, micro-batch by
    micro-batch, and zero its loss; (rows of micro-batch k, layer widths) for the runner."""
    per = cfg.batch // cfg.replicas
    mine = [idx[r * per:(r + 1) * per] for idx in idx_all]
    parts = [np.array_split(i, cfg.m) for i in mine]
    x_tr, y_tr = real.x_tr, real.y_tr

    def data(k, parts=parts):
        i = parts[k // cfg.m][k % cfg.m]
        return x_tr[i], y_tr[i]

    compute.data = data
    compute.loss = 0.0
    rows = lambda k, parts=parts: len(parts[k // cfg.m][k % cfg.m])  # noqa: E731
    return rows, real.sizes


def _timed_run(comm, runner, tasks, nb, rows, widths):
    """Run an epoch's tasks from a common start (a barrier): (spans, done, this rank's
    seconds); the runner's time counters cover this epoch only."""
    runner.t_allreduce = runner.t_wait = 0.0
    comm.Barrier()
    t0 = time.perf_counter()
    spans, done = runner.run(tasks, nb, rows, widths, clock0=t0)
    return spans, done, time.perf_counter() - t0


def _gather_weights(rank, r, pipe_comm, runner, compute, nlayers):
    """Every layer's current weights on rank 0, for evaluation (None on the other ranks)."""
    # replica 0's stages hand their current weights to rank 0
    mine_now = {l: compute.current(l) for l in runner.owned} if r == 0 else None
    got = pipe_comm.gather(mine_now, root=0) if r == 0 else None
    if rank != 0:
        return None
    merged = {}
    for part in got:
        merged.update(part)
    return [merged[l] for l in range(nlayers)]


def _epoch_record(cfg, epoch, seconds, nb, loss, full, real, meas):
    """Rank 0's record of one epoch, as log() gets it and the result lists it."""
    rec = {"epoch": epoch + 1, "seconds": seconds}
    if real is not None:
        rec.update(loss=float(loss / max(nb, 1)),
                   test_accuracy=_accuracy(full, real.x_te, real.y_te, cfg.activation))
    rec.update(allreduce_share=meas["allreduce_share"],
               pipeline_wait_share=meas["wait_share"], throughput=meas)
    return rec


def _result(cfg, model, epochs, full):
    """The result dict run returns on rank 0, as of the epochs so far."""
    result = {"config": asdict(cfg), "partition": model["partition"],
              "placement": {"stage_f": model["stage_f"],
                            "stage_w": model["stage_w"],
                            "stage_bew": model["stage_bew"],
                            "w_moved": model["w_moved"],
                            "bew_moved": model["bew_moved"]},
              "model": {k: v for k, v in model.items()
                        if k not in ("stage_f",)},
              "epochs": epochs}
    if full is not None:
        result["params"] = full
    return result
