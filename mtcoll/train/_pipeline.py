"""Pipeline stages and the schedules that drive them over MPI.

Process layout: world rank ``r * S + s`` is stage ``s`` of replica ``r``. ``COMM_WORLD.Split``
gives each replica a pipeline communicator (ranks = stages) and each stage a data-parallel
communicator (ranks = replicas), wrapped in :class:`mtcoll.Comm` for the gradient allreduce.

Who sends what (per micro-batch or mini-batch):

* forward: stage ``s`` sends its output activation to ``s+1`` (tag ``_FWD``);
* backward, ``pipedream``/``gpipe``/``1f1b``: stage ``s+1`` runs the whole backward of its layers
  (per layer: weight gradient, then activation gradient including the element-wise derivative
  of ``s``'s output) and then sends ``delta`` upstream;
* backward, ``layerpipe``: stage ``s+1`` first runs only the activation-gradient chain of its
  layers and sends the *matrix-product part* ``g = delta @ W.T`` upstream at once; stage ``s``
  applies the element-wise derivative of its own output (LayerPipe's inter-layer split); the
  weight gradients come after the send (the intra-layer split), each starting its bucket's
  ``Iallreduce`` as soon as the bucket is complete.

Progress: mtcoll moves a nonblocking allreduce only inside mtcoll calls, so a stage waiting for
a pipeline message polls it with ``Test`` and tests its pending allreduce requests in the same
loop; blocking in ``Recv`` instead can deadlock two replicas (each waiting in the pipeline for a
peer that waits in an allreduce for the other).
"""

from __future__ import annotations

import os
import time

import numpy as np
from mpi4py import MPI

import mtcoll

from . import _model

SCHEDULES = ("sequential", "gpipe", "1f1b", "pipedream", "layerpipe")
SYNCHRONOUS = ("gpipe", "1f1b")
_FWD, _BWD = 11, 12


class Stage:
    """Consecutive layers of the MLP on one process, with weight stashing and gradient buckets.

    Parameters
    ----------
    params : list of (W, b)
        This stage's layers, in order. Updates replace the arrays (never write into them), so a
        stash keeps the version a forward used by holding references.
    first, last : bool
        Whether the stage holds the network's first / last layer.
    dp : mtcoll.Comm or None
        Replicas of this stage; gradients are summed over it. ``None``: no replicas.
    bucket_bytes : int
        Gradients of consecutive layers (in backward order) share one allreduce until a bucket
        holds at least this many bytes.
    """

    def __init__(self, params, kind, *, first, last, lr, momentum, dp=None,
                 bucket_bytes=1 << 16, split_backward=False):
        self.params = [(w, b) for w, b in params]
        self.kind = kind
        self.first, self.last = first, last
        self.lr, self.momentum = lr, momentum
        self.dp = dp
        self.split = split_backward
        self.version = 0
        self.stash = {}            # micro-batch id -> (version, params, activations)
        self.velocity = [(np.zeros_like(w), np.zeros_like(b)) for w, b in self.params]
        self.pending = []          # allreduce requests in flight
        self.t_allreduce = 0.0
        self.log = []              # (mb, version its forward and backward used, current version)
        self._make_buckets(bucket_bytes)

    # -- gradient buckets ---------------------------------------------------------------------
    def _make_buckets(self, bucket_bytes):
        n = len(self.params)
        groups, cur, size = [], [], 0
        for i in range(n - 1, -1, -1):      # backward order: last layer first
            w, b = self.params[i]
            cur.append(i)
            size += (w.size + b.size) * w.itemsize
            if size >= bucket_bytes:
                groups.append(cur)
                cur, size = [], 0
        if cur:
            groups.append(cur)
        self.buckets = []
        self.grads = [None] * n
        self.bucket_closer = {}            # layer index whose gradient completes a bucket
        for g in groups:
            total = sum(self.params[i][0].size + self.params[i][1].size for i in g)
            flat = np.zeros(total, dtype=self.params[g[0]][0].dtype)
            off = 0
            for i in g:
                w, b = self.params[i]
                gw = flat[off:off + w.size].reshape(w.shape)
                off += w.size
                gb = flat[off:off + b.size]
                off += b.size
                self.grads[i] = (gw, gb)
            self.buckets.append(flat)
            self.bucket_closer[g[-1]] = len(self.buckets) - 1

    def zero_grads(self):
        for flat in self.buckets:
            flat[:] = 0.0

    def _grad_ready(self, i, final):
        """Layer ``i``'s gradient is accumulated; on the last micro-batch start its bucket."""
        if final and self.dp is not None and i in self.bucket_closer:
            t0 = time.perf_counter()
            flat = self.buckets[self.bucket_closer[i]]
            self.pending.append(self.dp.Iallreduce(MPI.IN_PLACE, flat, op=MPI.SUM))
            self.t_allreduce += time.perf_counter() - t0

    def progress(self):
        """Move pending allreduces on (mtcoll progresses only inside its calls)."""
        if self.pending:
            t0 = time.perf_counter()
            self.pending = [r for r in self.pending if not r.Test()]
            self.t_allreduce += time.perf_counter() - t0

    def update(self):
        """Wait for the gradient allreduce, then one SGD-with-momentum step; a new version."""
        t0 = time.perf_counter()
        mtcoll.waitall(self.pending)
        self.pending = []
        self.t_allreduce += time.perf_counter() - t0
        new = []
        for i, ((w, b), (gw, gb)) in enumerate(zip(self.params, self.grads)):
            vw, vb = self.velocity[i]
            vw = self.momentum * vw + gw
            vb = self.momentum * vb + gb
            self.velocity[i] = (vw, vb)
            new.append((w - self.lr * vw, b - self.lr * vb))
        self.params = new
        self.version += 1

    # -- compute ------------------------------------------------------------------------------
    def forward(self, mb, x):
        """Forward of micro-batch ``mb``; stashes the weights and activations it used."""
        acts = [x]
        n = len(self.params)
        for i, (w, b) in enumerate(self.params):
            acts.append(_model.forward_layer(w, b, acts[-1], self.kind,
                                             self.last and i == n - 1))
        self.stash[mb] = (self.version, self.params, acts)
        return acts[-1]

    def backward(self, mb, incoming, final, send_up=None):
        """Backward of micro-batch ``mb`` with the weights its forward used.

        ``incoming`` is ``delta`` of the stage's last layer (whole-backward mode, or the loss
        gradient on the last stage) or, with ``split_backward`` on a stage that is not last,
        the matrix-product part ``g`` from downstream, whose element-wise derivative this stage
        applies. ``send_up(arr)`` is called with what goes upstream: as soon as it exists with
        ``split_backward``; after the weight gradients otherwise. Gradients accumulate into the
        buckets; ``final`` marks the last micro-batch before an update.
        """
        version, params, acts = self.stash.pop(mb)
        self.log.append((mb, version, self.version))
        n = len(params)
        if self.split and not self.last:
            delta = _model.bew(incoming, acts[-1], self.kind)   # inter-layer split: our half
        else:
            delta = incoming
        if self.split:
            deltas = [None] * n
            for i in range(n - 1, -1, -1):                     # B tasks first
                deltas[i] = delta
                if i > 0:
                    delta = _model.bew(_model.bmm(params[i][0], delta), acts[i], self.kind)
                    self.progress()
                elif not self.first:
                    send_up(_model.bmm(params[0][0], delta))     # matrix product part only
            for i in range(n - 1, -1, -1):                     # then W tasks
                self._accumulate(i, acts[i], deltas[i], final)
        else:
            for i in range(n - 1, -1, -1):                     # whole backward, layer by layer
                self._accumulate(i, acts[i], delta, final)
                if i > 0 or not self.first:
                    delta = _model.bew(_model.bmm(params[i][0], delta), acts[i], self.kind)
            if not self.first:
                send_up(delta)

    def _accumulate(self, i, a_prev, delta, final):
        gw, gb = _model.wgrad(a_prev, delta)
        self.grads[i][0][...] += gw
        self.grads[i][1][...] += gb
        self._grad_ready(i, final)
        self.progress()


class Pipeline:
    """One process's view: its stage, its pipeline neighbours, the timers."""

    def __init__(self, stage: Stage, pipe, stage_index, stages):
        self.stage = stage
        self.pipe = pipe
        self.s = stage_index
        self.S = stages
        self.t_wait = 0.0
        self.sends = []

    def _recv(self, shape, source, tag):
        buf = np.empty(shape)
        req = self.pipe.Irecv(buf, source=source, tag=tag)
        t0 = time.perf_counter()
        while not req.Test():
            self.stage.progress()
            os.sched_yield()   # ranks may outnumber cores: let the peer we wait for run
        self.t_wait += time.perf_counter() - t0
        return buf

    def _send(self, arr, dest, tag):
        arr = np.ascontiguousarray(arr)
        self.sends.append((self.pipe.Isend(arr, dest=dest, tag=tag), arr))
        if len(self.sends) > 8:
            self.sends = [(r, a) for r, a in self.sends if not r.Test()]

    def drain(self):
        MPI.Request.Waitall([r for r, _ in self.sends])
        self.sends = []

    # one micro-batch forward / backward, with the messages
    def fwd(self, mb, x, y, scale, out_width, in_width):
        if self.s > 0:
            x = self._recv((len(y), in_width), self.s - 1, _FWD)
        out = self.stage.forward(mb, x)
        if self.s < self.S - 1:
            self._send(out, self.s + 1, _FWD)
            return None
        loss, delta = _model.loss_and_delta(out, y, scale)
        self._loss_delta[mb] = delta
        return loss

    def bwd(self, mb, n_rows, out_width, final):
        if self.s == self.S - 1:
            incoming = self._loss_delta.pop(mb)
        else:
            incoming = self._recv((n_rows, out_width), self.s + 1, _BWD)
        self.stage.backward(mb, incoming, final,
                            send_up=lambda a: self._send(a, self.s - 1, _BWD))


def run_epoch(pipe: Pipeline, schedule, batches, scale, micro_batches, widths):
    """One epoch. ``batches`` is a list of (x, y) of this replica's share of each mini-batch.

    Returns the summed loss (non-zero on the last stage only).
    """
    st = pipe.stage
    s, S = pipe.s, pipe.S
    in_w, out_w = widths
    pipe._loss_delta = {}
    total = 0.0
    if schedule in SYNCHRONOUS:
        m = micro_batches
        for x, y in batches:
            xs, ys = np.array_split(x, m), np.array_split(y, m)
            st.zero_grads()
            if schedule == "gpipe":
                for k in range(m):
                    total += pipe.fwd(k, xs[k], ys[k], scale, out_w, in_w) or 0.0
                for k in range(m):
                    pipe.bwd(k, len(ys[k]), out_w, final=k == m - 1)
            else:  # 1f1b with a flush at the end of the mini-batch
                warm = min(S - s - 1, m)
                for k in range(warm):
                    total += pipe.fwd(k, xs[k], ys[k], scale, out_w, in_w) or 0.0
                for i in range(m - warm):
                    k = warm + i
                    total += pipe.fwd(k, xs[k], ys[k], scale, out_w, in_w) or 0.0
                    pipe.bwd(i, len(ys[i]), out_w, final=i == m - 1)
                for i in range(m - warm, m):
                    pipe.bwd(i, len(ys[i]), out_w, final=i == m - 1)
            st.update()
    else:  # pipedream / layerpipe: asynchronous 1F1B over the epoch, an update per mini-batch
        n = len(batches)
        warm = min(S - s - 1, n)

        def backward(i):
            st.zero_grads()
            pipe.bwd(i, len(batches[i][1]), out_w, final=True)
            st.update()

        for k in range(warm):
            total += pipe.fwd(k, *batches[k], scale, out_w, in_w) or 0.0
        for i in range(n - warm):
            k = warm + i
            total += pipe.fwd(k, *batches[k], scale, out_w, in_w) or 0.0
            backward(i)
        for i in range(n - warm, n):
            backward(i)
    pipe.drain()
    return total
