"""One rank's part of a pipeline schedule: run the model's task list with real messages.

The schedule model (:func:`mtcoll.train.pipeline.simulate`) places every task -- ``F``,
``Bmm``, ``Bew``, ``W`` (layerpipe) or ``BW`` (a layer's whole backward) of every layer and
mini-batch -- on a stage and orders each stage's tasks. :class:`Runner` carries out one stage's
list in that order on one replica. A task waits until its inputs are here; whatever it produces
goes at once, as one nonblocking message, to every other stage that needs it:

=========  ===================================  =========================================
value      produced by (stage)                  needed by (stages)
=========  ===================================  =========================================
``a_l``    ``F_l`` (``stage_f[l]``)              ``F_(l+1)``, ``W_(l+1)``, ``Bew_(l+1)``
``g_l``    ``Bmm_l`` (``stage_f[l]``)            ``Bew_l``
``d_l``    ``Bew_(l+1)``, ``BW_(l+1)``, or the   ``Bmm_l``, ``W_l``, ``BW_l``
           loss after ``F_L``
``gw_l``   ``W_l`` / ``BW_l``                    the owner of layer ``l`` (``stage_f[l]``)
=========  ===================================  =========================================

So a W that the model moved to the neighbouring stage costs one extra message there (``d_l``
when it moved upstream, ``a_(l-1)`` when it moved downstream; the network's input is on every
rank and never travels), and its gradient ``gw_l`` goes back to the owner, which averages it
over the replicas with its other gradients (docs/training.md draws this).

Weights: every layer's forward of mini-batch ``k`` uses version ``weight_version(k, delay)``
(the updates of mini-batches ``0 .. k - delay``) and stashes it for the backward; an update
needs the mini-batch's gradient from all its micro-batches, summed over the replicas, and is
applied in mini-batch order. The arithmetic therefore depends on neither the partition, nor
the placement of the W tasks, nor the timing: pipedream and layerpipe give the same weights.

Compute is pluggable: :class:`RealCompute` runs the numpy MLP, :class:`EmulatedCompute` sleeps
each task's modelled time and sends messages of the profile's sizes.

Progress: mtcoll moves a nonblocking allreduce only inside mtcoll calls, so every wait here
(for a message, or inside an emulated task's sleep) tests the pending allreduces.
"""

from __future__ import annotations

import os
import time

import numpy as np
from mpi4py import MPI

import mtcoll

from . import _mlp
from .pipeline import weight_version

_KINDS = {"a": 0, "g": 1, "d": 2, "gw": 3}
#: tags carry (mini-batch mod _WRAP, value, layer); at most S mini-batches are in flight
_WRAP = 128
MAX_LAYERS = 60          # keeps every tag below 32768, the MPI standard's guaranteed bound


def tag_of(k, kind, layer, layers):
    return ((k % _WRAP) * len(_KINDS) + _KINDS[kind]) * (layers + 1) + layer + 1


class Placement:
    """Where every task of the network runs: ``stage_f``, ``stage_w``, ``stage_ew`` per layer,
    and whether a layer's backward is split (layerpipe) or one task (the other schedules)."""

    def __init__(self, stage_f, stage_w, stage_ew, split):
        self.f = [int(x) for x in stage_f]
        self.w = [int(x) for x in stage_w]
        self.ew = [int(x) for x in stage_ew]
        self.split = split
        self.layers = len(self.f)

    def producer(self, kind, l):
        if kind in ("a", "g"):
            return self.f[l]
        if kind == "d":
            if l == self.layers - 1:
                return self.f[l]                    # the loss, after F of the last layer
            return self.ew[l + 1] if self.split else self.f[l + 1]
        return self.w[l] if self.split else self.f[l]   # "gw"

    def consumers(self, kind, l):
        if kind == "a":
            if l + 1 >= self.layers:
                return set()
            if self.split:
                return {self.f[l + 1], self.w[l + 1], self.ew[l + 1]}
            return {self.f[l + 1]}
        if kind == "g":
            return {self.ew[l]}
        if kind == "d":
            if not self.split:
                return {self.f[l]}
            return {self.f[l], self.w[l]} if l > 0 else {self.w[l]}   # no Bmm of layer 0
        return {self.f[l]}                          # "gw": the owner

    def inputs(self, kind, l):
        """Values a task reads: (value, layer) pairs (``a_-1``, the input, is local)."""
        if kind == "F":
            return [("a", l - 1)]
        if kind == "Bmm":
            return [("d", l)]
        if kind == "Bew":
            return [("g", l), ("a", l - 1)]
        return [("a", l - 1), ("d", l)]             # W and BW


class RealCompute:
    """The numpy MLP: weights with their versions, stashes, SGD with momentum.

    ``params[l]`` for the layers this stage owns; ``data(k)`` gives micro-batch ``k``'s
    ``(x, y)`` rows of this replica; ``scale`` divides the summed loss (the global batch).
    """

    emulated = False

    def __init__(self, params, kind, layers, data, scale, lr, momentum, split):
        self.kind, self.layers, self.data, self.scale = kind, layers, data, scale
        self.split = split
        self.lr, self.momentum = lr, momentum
        self.versions = {l: {0: p} for l, p in params.items()}
        self._sizes = {l: w.size + b.size for l, (w, b) in params.items()}
        self.velocity = {l: (np.zeros_like(w), np.zeros_like(b)) for l, (w, b) in params.items()}
        self.stash = {}
        self.loss = 0.0

    def grad_size(self, l):
        return self._sizes[l]

    def input(self, k):
        return self.data(k)[0]

    def forward(self, k, l, a_prev, version):
        w, b = self.versions[l][version]
        if l > 0 or not self.split:     # read by Bmm or BW (layer 0 has no Bmm)
            self.stash[(k, l)] = w
        last = l == self.layers - 1
        out = _mlp.forward_layer(w, b, a_prev, self.kind, last)
        if not last:
            return out, None
        loss, delta = _mlp.loss_and_delta(out, self.data(k)[1], self.scale)
        self.loss += loss
        return out, delta

    def bmm(self, k, l, delta):
        return _mlp.bmm(self.stash.pop((k, l)), delta)

    def bew(self, g, a_prev, l):
        return _mlp.bew(g, a_prev, self.kind)

    def wgrad(self, a_prev, delta, l):
        gw, gb = _mlp.wgrad(a_prev, delta)
        return np.concatenate([gw.ravel(), gb])

    def bw(self, k, l, a_prev, delta):
        gw = self.wgrad(a_prev, delta, l)
        if l == 0:
            self.stash.pop((k, l))
            return gw, None
        return gw, self.bew(self.bmm(k, l, delta), a_prev, l)

    def accumulate(self, flat, grad):
        flat += grad

    def update(self, l, grad, version):
        """Apply the summed gradient ``grad`` (flat) as version ``version + 1`` of layer ``l``;
        versions older than ``keep`` are dropped by :meth:`prune`."""
        w, b = self.versions[l][version]
        vw, vb = self.velocity[l]
        vw = self.momentum * vw + grad[:w.size].reshape(w.shape)
        vb = self.momentum * vb + grad[w.size:]
        self.velocity[l] = (vw, vb)
        self.versions[l][version + 1] = (w - self.lr * vw, b - self.lr * vb)

    def prune(self, l, oldest):
        for v in [v for v in self.versions[l] if v < oldest]:
            del self.versions[l][v]

    def current(self, l):
        return self.versions[l][max(self.versions[l])]


class EmulatedCompute:
    """Tasks that take their modelled time asleep, and values of the profile's sizes.

    ``profile``: a :class:`~mtcoll.train.pipeline.Profile` with ``act`` and ``params``;
    ``seconds``: seconds per unit of the profile's cost; ``elements``: message elements per
    element of the profile's tensors (the sizes are scaled to fit memory; at least one).
    """

    emulated = True

    def __init__(self, profile, seconds, elements, layers, micro_batches=1):
        # a micro-batch is 1/M of the mini-batch: 1/M of its time and of its activations
        self.p, self.seconds, self.layers = profile, seconds / micro_batches, layers
        act = profile.act if profile.act is not None else np.full(layers, 1024.0)
        par = profile.params if profile.params is not None else np.full(layers, 1024.0)
        self.act = [max(1, int(round(x * elements / micro_batches))) for x in act]
        self.par = [max(1, int(round(x * elements))) for x in par]
        # what is sent only needs a size: one array per value, sent as often as needed
        self._a = [np.zeros(n, np.float32) for n in self.act]
        self._g = [np.zeros(n, np.float32) for n in self.par]
        self.loss = 0.0
        self.progress = lambda: False      # the Runner's, which tests pending allreduces

    def grad_size(self, l):
        return self.par[l]

    def value_size(self, kind, l):
        if kind == "a":
            return self.act[l]
        if kind == "g":
            return self.act[l - 1]      # dLoss/da_(l-1): the shape of the layer's input
        if kind == "d":
            return self.act[l]
        return self.par[l]

    def _sleep(self, cost):
        """Sleep ``cost * seconds``; while allreduces are pending, wake every millisecond to
        test them (mtcoll progresses only inside its calls)."""
        end = time.perf_counter() + cost * self.seconds
        while True:
            left = end - time.perf_counter()
            if left <= 0:
                return
            if self.progress():
                time.sleep(min(left, 1e-3))
            else:
                time.sleep(left)

    def input(self, k):
        return None

    def forward(self, k, l, a_prev, version):
        self._sleep(self.p.f[l])
        return self._a[l], (self._a[l] if l == self.layers - 1 else None)

    def bmm(self, k, l, delta):
        self._sleep(self.p.b[l] - self.p.ew[l])
        return self._a[l - 1]

    def bew(self, g, a_prev, l):
        self._sleep(self.p.ew[l])
        return self._a[l - 1]

    def wgrad(self, a_prev, delta, l):
        self._sleep(self.p.w[l])
        return self._g[l]

    def bw(self, k, l, a_prev, delta):
        self._sleep(self.p.b[l] + self.p.w[l])
        return self._g[l], (self._a[l - 1] if l > 0 else None)

    def accumulate(self, flat, grad):
        pass    # the allreduce still moves the bucket; nothing needs its values

    def update(self, l, grad, version):
        pass

    def prune(self, l, oldest):
        pass


class Runner:
    """One rank: stage ``s`` of ``S`` in one replica, running its task lists.

    Parameters
    ----------
    compute : RealCompute or EmulatedCompute
    place : Placement
    pipe : MPI.Intracomm
        This replica's pipeline communicator (rank = stage).
    dp : mtcoll.Comm or None
        This stage's replicas; each bucket's gradient is summed over it with ``Iallreduce``.
    micro_batches : int
        Micro-batches per mini-batch (gpipe, 1f1b; 1 for the asynchronous schedules).
    delay : int
        Weight versions: mini-batch ``i``'s forward uses :func:`weight_version` ``(i, delay)``
        (1 for gpipe/1f1b: the previous mini-batch's update; S for pipedream/layerpipe).
    """

    def __init__(self, compute, place, pipe, dp, s, S, *, micro_batches=1, delay=1,
                 bucket_bytes=1 << 16, itemsize=8):
        self.c, self.place, self.pipe, self.dp = compute, place, pipe, dp
        self.s, self.S, self.M, self.delay = s, S, micro_batches, delay
        self.L = place.layers
        self.owned = [l for l in range(self.L) if place.f[l] == s]
        self.version = {l: 0 for l in self.owned}
        compute.progress = self.progress
        self._make_buckets(bucket_bytes, itemsize)
        self.t_allreduce = self.t_wait = 0.0
        self.sends = []
        self.emulated = compute.emulated

    def _make_buckets(self, bucket_bytes, itemsize):
        groups, cur, size = [], [], 0
        for l in reversed(self.owned):        # backward order
            cur.append(l)
            size += self.c.grad_size(l) * itemsize
            if size >= bucket_bytes:
                groups.append(cur)
                cur, size = [], 0
        if cur:
            groups.append(cur)
        self.buckets = groups
        self.bucket_of = {l: i for i, g in enumerate(groups) for l in g}
        self.offset = {}
        for g in groups:
            off = 0
            for l in g:
                self.offset[l] = (off, off + self.c.grad_size(l))
                off += self.c.grad_size(l)
        self.bucket_len = [sum(self.c.grad_size(l) for l in g) for g in groups]

    # -- messages -----------------------------------------------------------------------------
    def _send(self, k, kind, l, arr):
        if arr is None:
            return
        me = self.s
        for dest in sorted(self.place.consumers(kind, l) - {me}):
            arr = np.ascontiguousarray(arr)
            self.sends.append((self.pipe.Isend(arr, dest=dest, tag=tag_of(k, kind, l, self.L)),
                               arr))
        if len(self.sends) > 16:
            self.sends = [(r, a) for r, a in self.sends if not r.Test()]

    def _post(self, k, kind, l, shape):
        key = (k, kind, l)
        if key not in self.posted:
            buf = np.empty(shape, np.float32 if self.emulated else np.float64)
            src = self.place.producer(kind, l)
            self.posted[key] = (self.pipe.Irecv(buf, source=src, tag=tag_of(k, kind, l, self.L)),
                                buf)

    def _shape(self, k, kind, l):
        if self.emulated:
            return (self.c.value_size(kind, l),)
        rows = self.rows(k)
        if kind == "gw":
            return (self.c.grad_size(l),)
        if kind == "g":
            return (rows, self.widths[l])
        return (rows, self.widths[l + 1])        # a_l and d_l: layer l's output width

    def _get(self, k, kind, l):
        """Value ``(kind, l)`` of micro-batch ``k``: local, or received (waiting for it)."""
        if kind == "a" and l < 0:
            return self.c.input(k)
        key = (k, kind, l)
        if key in self.local:
            return self.local.pop(key) if self._last_use(key) else self.local[key]
        self._post(k, kind, l, self._shape(k, kind, l))
        req, buf = self.posted[key]
        self._wait(lambda: req.Test())
        del self.posted[key]
        if self._uses.get(key, 1) > 1:
            self.local[key] = buf
            self._uses[key] -= 1
        return buf

    def _last_use(self, key):
        n = self._uses.get(key, 1) - 1
        self._uses[key] = n
        return n <= 0

    def _put(self, k, kind, l, arr):
        """Keep a value produced here for the local tasks that need it; send it to the others."""
        self._send(k, kind, l, arr)
        if arr is not None and self.s in self.place.consumers(kind, l):
            self.local[(k, kind, l)] = arr

    def _wait(self, done):
        t0 = time.perf_counter()
        polls = 0
        while not done():
            self.progress()
            polls += 1
            if polls > 64:
                time.sleep(2e-4)    # ranks outnumber cores: do not spin while others work
            else:
                os.sched_yield()
        self.t_wait += time.perf_counter() - t0

    # -- gradients and updates ----------------------------------------------------------------
    def progress(self):
        """Test the pending allreduces; apply every update that is complete, in order.
        Returns whether anything is still pending (allreduces, gradients from other stages)."""
        if self.reduce:
            t0 = time.perf_counter()
            for key in [k for k, r in self.reduce.items() if r.Test()]:
                del self.reduce[key]
                self.reduced.add(key)
            self.t_allreduce += time.perf_counter() - t0
        self._apply()
        if self.grad_posts:
            for key in [k for k, (r, _) in self.grad_posts.items() if r.Test()]:
                _, buf = self.grad_posts.pop(key)
                self._contribute(key[0], key[2], buf)
        return bool(self.reduce or self.grad_posts)

    def _contribute(self, k, l, grad):
        """Micro-batch ``k``'s gradient of owned layer ``l``; a full bucket starts its allreduce."""
        i = k // self.M
        bi = self.bucket_of[l]
        key = (bi, i)
        if key not in self.flat:
            self.flat[key] = np.zeros(self.bucket_len[bi],
                                      np.float32 if self.emulated else np.float64)
            self.count[key] = 0
        lo, hi = self.offset[l]
        self.c.accumulate(self.flat[key][lo:hi], grad)
        self.count[key] += 1
        if self.count[key] == self.M * len(self.buckets[bi]):
            self.complete.add((i, bi))
            self._start_reduces()

    def _start_reduces(self):
        """Start the allreduce of every complete bucket, in the order (mini-batch, bucket):
        the replicas must start their collectives in one order, and remote gradients may
        complete a bucket at any time."""
        while self.next_reduce in self.complete:
            i, bi = self.next_reduce
            self.complete.discard((i, bi))
            key = (bi, i)
            if self.dp is None:
                self.reduced.add(key)
            else:
                t0 = time.perf_counter()
                self.reduce[key] = self.dp.Iallreduce(MPI.IN_PLACE, self.flat[key], op=MPI.SUM)
                self.t_allreduce += time.perf_counter() - t0
            self.next_reduce = (i, bi + 1) if bi + 1 < len(self.buckets) else (i + 1, 0)

    def _apply(self):
        for bi, group in enumerate(self.buckets):
            while (bi, self.next_update[bi]) in self.reduced:
                i = self.next_update[bi]
                key = (bi, i)
                self.reduced.discard(key)
                flat = self.flat.pop(key)
                for l in group:
                    lo, hi = self.offset[l]
                    self.c.update(l, flat[lo:hi], self.version[l])
                    self.version[l] += 1
                    self.c.prune(l, self.version[l] - self.delay - 1)
                self.next_update[bi] = i + 1

    # -- tasks --------------------------------------------------------------------------------
    def _run_task(self, k, kind, l):
        """Wait for the task's inputs (and, for F, its weight version), then compute; returns
        the time the computation started (the task is busy from then on)."""
        c = self.c
        got = [self._get(k, v, vl) for v, vl in self.place.inputs(kind, l)]
        if kind == "F":
            need = self.base + weight_version(k // self.M, self.delay)
            self._wait(lambda: self.version[l] >= need)
            if self.place.w[l] != self.s:
                self._post_grad(k, l)
        t0 = time.perf_counter()
        if kind == "F":
            out, delta = c.forward(k, l, got[0], need)
            self._put(k, "a", l, out)
            if delta is not None:
                self._put(k, "d", l, delta)
        elif kind == "Bmm":
            self._put(k, "g", l, c.bmm(k, l, got[0]))
        elif kind == "Bew":
            self._put(k, "d", l - 1, c.bew(got[0], got[1], l))
        elif kind == "W":
            self._grad_out(k, l, c.wgrad(got[0], got[1], l))
        elif kind == "BW":
            grad, d = c.bw(k, l, got[0], got[1])
            self._grad_out(k, l, grad)
            if l > 0:
                self._put(k, "d", l - 1, d)
        else:
            raise ValueError(f"unknown task kind {kind!r}")
        return t0

    def _grad_out(self, k, l, grad):
        if self.place.f[l] == self.s:
            self._contribute(k, l, grad)
        else:
            self._send(k, "gw", l, grad)

    def _post_grad(self, k, l):
        """The owner expects micro-batch ``k``'s gradient of layer ``l`` from the stage its W
        moved to (posted at the forward, so that at most the in-flight batches wait)."""
        key = (k, "gw", l)
        buf = np.empty(self._shape(k, "gw", l), np.float32 if self.emulated else np.float64)
        self.grad_posts[key] = (self.pipe.Irecv(buf, source=self.place.w[l],
                                                tag=tag_of(k, "gw", l, self.L)), buf)

    def run(self, tasks, batches, rows=None, widths=None, clock0=None):
        """Run ``tasks`` (this stage's ``(k, kind, layer)`` list, micro-batch ids ``k`` global in
        the run) for ``batches`` mini-batches; return this rank's timeline.

        ``rows(k)``: rows of micro-batch ``k`` (real compute); ``widths``: the layer sizes.
        The timeline is ``(spans, done)``: ``spans`` an array of (start, end) seconds of every
        task since ``clock0``, ``done[i]`` the end of this rank's last task of mini-batch ``i``.
        """
        self.rows, self.widths = rows, widths
        self.local, self.posted, self.grad_posts, self._uses = {}, {}, {}, {}
        self.flat, self.count, self.reduce, self.reduced = {}, {}, {}, set()
        self.next_update = [0] * len(self.buckets)
        self.complete, self.next_reduce = set(), (0, 0)
        # versions continue across runs (epochs); a run counts its mini-batches from 0
        self.base = min(self.version.values()) if self.owned else 0
        # every local value is read by a known number of local tasks: count them, so that a
        # value is dropped after its last use
        for k, kind, l in tasks:
            for v, vl in self.place.inputs(kind, l):
                if not (v == "a" and vl < 0):
                    key = (k, v, vl)
                    self._uses[key] = self._uses.get(key, 0) + 1
        clock0 = time.perf_counter() if clock0 is None else clock0
        spans = np.zeros((len(tasks), 2))
        done = np.zeros(batches)
        for n, (k, kind, l) in enumerate(tasks):
            t0 = self._run_task(k, kind, l)
            t1 = time.perf_counter()
            spans[n] = (t0 - clock0, t1 - clock0)
            done[k // self.M] = max(done[k // self.M], t1 - clock0)
        # the updates of the last mini-batches, then the sends
        want = self.base + batches
        self._wait(lambda: all(v >= want for v in self.version.values()))
        MPI.Request.Waitall([r for r, _ in self.sends])
        self.sends = []
        return spans, done


def message_list(place: Placement):
    """The messages of one mini-batch under ``place``: a set of (value, layer, from, to)."""
    out = set()
    for l in range(place.layers):
        kinds = ["a", "d", "gw"] + (["g"] if place.split and l > 0 else [])
        for kind in kinds:
            src = place.producer(kind, l)
            for dst in place.consumers(kind, l) - {src}:
                out.add((kind, l, src, dst))
    return out
