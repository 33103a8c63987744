"""The training loop: data order, process layout, stage partition, epochs, evaluation.

:func:`run` is collective over ``comm`` (``stages * replicas`` processes); :func:`run_sequential`
is the one-process reference that every schedule is checked against.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field

import numpy as np
from mpi4py import MPI

import mtcoll

from . import _data, _model
from ._pipeline import SCHEDULES, SYNCHRONOUS, Pipeline, Stage, run_epoch


@dataclass
class Config:
    schedule: str = "layerpipe"
    stages: int = 2
    replicas: int = 1
    data: str = "digits"
    depth: int = _model.DEFAULT_DEPTH
    width: int = _model.DEFAULT_WIDTH
    activation: str = "relu"
    epochs: int = 15
    batch: int = 32                 # global mini-batch, split over replicas
    micro_batches: int = 4          # per replica and mini-batch, gpipe and 1f1b only
    lr: float = 0.02
    momentum: float = 0.9
    seed: int = 0
    algorithm: str = "multitree"
    bucket_bytes: int = 1 << 16
    partition: list = field(default=None)   # first layer of each stage; None: balanced by cost

    def check(self):
        if self.schedule not in SCHEDULES:
            raise ValueError(f"unknown schedule {self.schedule!r}; choose from {', '.join(SCHEDULES)}")
        if self.schedule == "sequential" and (self.stages, self.replicas) != (1, 1):
            raise ValueError("schedule 'sequential' runs on one process: --stages 1 --replicas 1")
        if self.activation not in _model.ACTIVATIONS:
            raise ValueError(f"unknown activation {self.activation!r}")
        if self.stages > self.depth + 1:
            raise ValueError(f"{self.depth + 1} layers cannot fill {self.stages} stages")
        per = self.batch // self.replicas
        if self.batch % self.replicas or per < 1:
            raise ValueError(f"--batch {self.batch} must be a multiple of --replicas {self.replicas}")
        if self.schedule in SYNCHRONOUS and per % self.micro_batches:
            raise ValueError(f"a replica's share of the batch ({per}) must be a multiple of "
                             f"--micro-batches {self.micro_batches}")


def _batches(n_train, batch, epoch, seed):
    order = np.random.default_rng([seed, epoch]).permutation(n_train)
    steps = n_train // batch   # the incomplete last mini-batch is dropped
    return [order[i * batch:(i + 1) * batch] for i in range(steps)]


def _accuracy(params, x, y, kind):
    return float((_model.predict(params, x, kind) == y).mean())


def _sgd(params, velocity, grads, lr, momentum):
    out = []
    for i, ((w, b), (gw, gb)) in enumerate(zip(params, grads)):
        vw, vb = velocity[i]
        vw = momentum * vw + gw
        vb = momentum * vb + gb
        velocity[i] = (vw, vb)
        out.append((w - lr * vw, b - lr * vb))
    return out


def run_sequential(cfg: Config, log=None, steps=None):
    """The reference: the whole network on one process, one update per global mini-batch.

    ``steps`` stops after that many updates (tests). Returns the result dict with ``params``.
    """
    x_tr, y_tr, x_te, y_te = _data.load(cfg.data, cfg.seed)
    sizes = _model.layer_sizes(x_tr.shape[1], int(y_tr.max()) + 1, cfg.depth, cfg.width)
    params = _model.init_params(sizes, cfg.seed)
    velocity = [(np.zeros_like(w), np.zeros_like(b)) for w, b in params]
    epochs, done = [], 0
    for epoch in range(cfg.epochs):
        t0 = time.perf_counter()
        losses = []
        for idx in _batches(len(y_tr), cfg.batch, epoch, cfg.seed):
            if steps is not None and done >= steps:
                break
            loss, grads = _model.sequential_step(params, x_tr[idx], y_tr[idx], cfg.activation,
                                                 cfg.batch)
            params = _sgd(params, velocity, grads, cfg.lr, cfg.momentum)
            losses.append(loss)
            done += 1
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


def run(cfg: Config, comm=None, log=None, steps=None):
    """Train with ``cfg.schedule`` on ``comm`` (``stages * replicas`` processes; collective).

    Rank 0 of ``comm`` returns the result dict (``config``, ``partition``, ``epochs``, and
    ``params``: the final weights of every layer); the other ranks return None. ``steps`` stops
    after that many mini-batches (whole mini-batches; the tests use it). ``log(record)`` is
    called on rank 0 after every epoch.
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
    x_tr, y_tr, x_te, y_te = _data.load(cfg.data, cfg.seed)
    sizes = _model.layer_sizes(x_tr.shape[1], int(y_tr.max()) + 1, cfg.depth, cfg.width)
    nlayers = len(sizes) - 1
    params = _model.init_params(sizes, cfg.seed)
    partition = cfg.partition
    if partition is None:
        if rank == 0:
            from .schedule import partition_layers

            rows = cfg.batch // R
            if cfg.schedule in SYNCHRONOUS:
                rows //= cfg.micro_batches
            f, b, w, _ = _model.measure_layer_costs(sizes, cfg.activation, max(rows, 1), 10)
            partition = [int(a) for a in partition_layers(f + b + w, S)]
        partition = comm.bcast(partition, root=0)
    if len(partition) != S or partition[0] != 0 or sorted(set(partition)) != list(partition) \
            or partition[-1] >= nlayers:
        raise ValueError(f"bad partition {partition} for {S} stages of {nlayers} layers")
    lo = partition[s]
    hi = partition[s + 1] if s + 1 < S else nlayers
    pipe_comm = comm.Split(color=r, key=s)
    dp_raw = comm.Split(color=s, key=r)
    dp = mtcoll.Comm(dp_raw, algorithm=cfg.algorithm) if R > 1 else None
    stage = Stage(params[lo:hi], cfg.activation, first=s == 0, last=s == S - 1, lr=cfg.lr,
                  momentum=cfg.momentum, dp=dp, bucket_bytes=cfg.bucket_bytes,
                  split_backward=cfg.schedule == "layerpipe")
    pipe = Pipeline(stage, pipe_comm, s, S)
    widths = (sizes[lo], sizes[hi])
    per = cfg.batch // R
    epochs, done = [], 0
    result = None
    try:
        for epoch in range(cfg.epochs):
            idx_all = _batches(len(y_tr), cfg.batch, epoch, cfg.seed)
            if steps is not None:
                idx_all = idx_all[:max(0, steps - done)]
            mine = [idx[r * per:(r + 1) * per] for idx in idx_all]
            batches = [(x_tr[i], y_tr[i]) for i in mine]
            stage.t_allreduce = pipe.t_wait = 0.0
            comm.Barrier()
            t0 = time.perf_counter()
            loss = run_epoch(pipe, cfg.schedule, batches, cfg.batch, cfg.micro_batches, widths)
            seconds = time.perf_counter() - t0
            done += len(batches)
            # evaluation: replica 0's pipeline hands its weights to rank 0
            gathered = pipe_comm.gather(stage.params, root=0) if r == 0 else None
            stats = comm.reduce(np.array([loss, stage.t_allreduce / seconds,
                                          pipe.t_wait / seconds]), op=MPI.SUM, root=0)
            seconds = comm.allreduce(seconds, op=MPI.MAX)
            if rank == 0:
                full = [p for part in gathered for p in part]
                rec = {"epoch": epoch + 1,
                       "loss": float(stats[0] / max(len(batches), 1)),
                       "test_accuracy": _accuracy(full, x_te, y_te, cfg.activation),
                       "seconds": seconds,
                       "allreduce_share": float(stats[1] / comm.Get_size()),
                       "pipeline_wait_share": float(stats[2] / comm.Get_size())}
                epochs.append(rec)
                if log:
                    log(rec)
                result = {"config": asdict(cfg), "partition": partition, "epochs": epochs,
                          "params": full}
            if steps is not None and done >= steps:
                break
        return result
    finally:
        if dp is not None:
            dp.Free()
        dp_raw.Free()
        pipe_comm.Free()
