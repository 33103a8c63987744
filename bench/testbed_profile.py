"""Where an allreduce's time goes on the testbed: every piece's times on every rank
(docs/testbed.md, "Where the time goes").

    python -m mtcoll.testbed --topology torus:4x4 --rate 20mbit -- \
        python bench/testbed_profile.py trace ALGO SIZE CALLS OUT.json [--order K]
    python bench/testbed_profile.py summary RATE OUT.json...

``trace`` runs CALLS allreduces of SIZE bytes (float32, a barrier before each) and records, per
rank, when each piece of the executor became ready (a send posted, a receive posted or
combined) and when its request completed; rank 0 writes them all to OUT.json. It wraps two
methods of ``mtcoll.execute.Execution`` in this process (nothing is changed in the library).
``--order K`` is the experiment of docs/testbed.md: a send piece also waits until the send
piece K earlier to the same peer has completed (each connection then carries its messages in
program order, K in flight). Run it with ``env PYTHONPATH=DIR`` to trace another checkout's
``mtcoll`` (``git archive main mtcoll | tar -x -C DIR``) on the same testbed.

``summary`` prints per call: the slowest rank's time, the spread of the ranks' starts (the
barrier's release), each message's time from posting (for a gather receive: from the later of
the two postings) to arrival over the time a 256 KiB piece takes at RATE (headers counted), how
many messages were posted while an earlier one on the same directed link was still arriving,
and how long after the receiver had a message its sender saw the send complete.
"""

from __future__ import annotations

import collections
import json
import sys
import time

import numpy as np

from mtcoll.bench import parse_size

FRAME = 1514 / 1448  # bytes tbf counts per payload byte of a full TCP segment


def _order(K):
    """Make every send piece wait for the completion of the send K earlier to the same peer."""
    from mtcoll import execute as ex

    orig = ex.Layout.__init__

    def init(self, *a, **kw):
        orig(self, *a, **kw)
        dep = [list(d) for d in self.dependents]
        npend = list(self.npending)
        last = collections.defaultdict(list)
        for p in range(self.npieces):
            if self.kind[p] == ex.SEND:
                q = last[self.peer[p]]
                if len(q) >= K:
                    dep[q[-K]].append(p)
                    npend[p] += 1
                q.append(p)
        self.dependents = tuple(tuple(sorted(d)) for d in dep)
        self.npending = tuple(npend)
        self.ready = tuple(p for p in range(self.npieces) if npend[p] == 0
                           and not (self.kind[p] == ex.RECV and self.phase[p] == ex.REDUCE))

    ex.Layout.__init__ = init


def trace(algo, size, calls, out, order=0):
    from mpi4py import MPI

    import mtcoll
    from mtcoll import execute as ex

    if order:
        _order(order)
    log = []

    def ev(lay, what, p):
        log.append((time.time(), what, int(p), int(lay.kind[p]), int(lay.phase[p]),
                    int(lay.peer[p]), int(lay.tagnum[p]), int(lay.b[p] - lay.a[p])))

    class Work(collections.deque):  # logs each piece as _run takes it
        def popleft(self):
            p = super().popleft()
            ev(self.lay, "ready", p)
            return p

    run, complete = ex.Execution._run, ex.Execution._complete

    def _run(self, work):
        w = Work(work)
        w.lay = self.layout
        return run(self, w)

    def _complete(self, indices):
        for i in indices:
            ev(self.layout, "done", self._req_piece[i])
        return complete(self, indices)

    ex.Execution._run, ex.Execution._complete = _run, _complete
    world = MPI.COMM_WORLD
    comm = mtcoll.Comm(world, algorithm=algo)
    x = np.ones(parse_size(size) // 4, np.float32)
    y = np.empty_like(x)
    comm.Allreduce(x, y)
    rec = []
    for _ in range(int(calls)):
        world.Barrier()
        log.clear()
        t0 = time.time()
        comm.Allreduce(x, y)
        rec.append((t0, time.time(), list(log)))
        if not (y == world.Get_size()).all():
            raise RuntimeError(f"rank {world.Get_rank()}: wrong result")
    every = world.gather(rec, 0)
    if world.Get_rank() == 0:
        with open(out, "w") as f:
            json.dump(every, f)
    comm.Free()


def summary(rate, paths):
    from mtcoll.testbed._layout import parse_rate

    piece = 256 * 1024 * FRAME / parse_rate(rate)
    for path in paths:
        with open(path) as f:
            every = json.load(f)
        n = len(every)
        for c in range(len(every[0])):
            t0 = min(every[r][c][0] for r in range(n))
            msgs = {}
            for r in range(n):
                for t, what, _p, kind, phase, peer, tag, _n in every[r][c][2]:
                    send = kind == 0
                    m = msgs.setdefault((r, peer, tag) if send else (peer, r, tag), {})
                    m[("s" if send else "r") + what] = t
                    m["phase"] = phase
            took, link = [], collections.defaultdict(list)
            for (s, r, _tag), m in msgs.items():
                start = m["sready"] if m["phase"] == 0 else max(m["sready"], m["rready"])
                took.append((m["rdone"] - start) / piece)
                link[(s, r)].append((start, m["rdone"]))
            busy = sum(1 for iv in link.values() for a, b in zip(sorted(iv), sorted(iv)[1:])
                       if b[0] < a[1])
            late = np.median([m["sdone"] - m["rdone"] for m in msgs.values()])
            took = np.array(took)
            print(f"{path} call {c}: slowest rank {max(e[c][1] - e[c][0] for e in every):.3f} s, "
                  f"starts spread {(max(e[c][0] for e in every) - t0) * 1e3:.0f} ms; "
                  f"{len(took)} messages, posted-to-arrived / piece time median "
                  f"{np.median(took):.2f} p90 {np.percentile(took, 90):.2f} max {took.max():.2f}; "
                  f"{busy} posted while their link was busy; send seen complete "
                  f"{late * 1e3:.0f} ms (median) after arrival")
    return 0


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] in (["-h"], ["--help"]):
        print(__doc__)
        return 0
    if argv[:1] == ["trace"] and len(argv) in (5, 7):
        order = int(argv[6]) if len(argv) == 7 and argv[5] == "--order" else 0
        trace(*argv[1:5], order=order)
        return 0
    if argv[:1] == ["summary"] and len(argv) >= 3:
        return summary(argv[1], argv[2:])
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
