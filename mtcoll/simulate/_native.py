"""A model of what the MPI library itself does for ``Allreduce``, as a :class:`Schedule` the
simulator replays over the topology's default routes (``algorithm="native"``).

MPICH's default choice for an intra-communicator allreduce with a built-in commutative op
(``MPIR_Allreduce_intra_auto``, MPICH 3 and 4):

* ``count * itemsize <= MPIR_CVAR_ALLREDUCE_SHORT_MSG_SIZE`` (2048 bytes), or fewer elements
  than ``pof2`` (the largest power of two <= N): **recursive doubling**: every round each rank
  exchanges its whole buffer with ``rank ^ mask``, ``mask = 1, 2, 4, ...``;
* otherwise **Rabenseifner** (``reduce_scatter_allgather``): recursive halving with
  ``mask = 1, 2, 4, ...`` -- the first round swaps half of the buffer with ``rank ^ 1`` (the
  lower rank of a pair keeps the lower half), the next a quarter with ``rank ^ 2``, and so on --
  then recursive doubling back with ``mask = pof2/2, ..., 1``.

With N not a power of two, the first ``2 * (N - pof2)`` ranks pair up first: each even one sends
its buffer to the odd one above it, sits out, and gets the result back at the end (as
:func:`mtcoll.plan` ``rhd`` does; rhd walks the masks the other way, far partners first).

Every round is one step: the library sends all of a round's messages at once, and on a network
whose routes share links they share them (the simulator's fair sharing); mtcoll's own ``rhd``
instead spreads a round over contention-free steps. The routes are the topology's default ones,
which the testbed installs in the kernel.
"""

from __future__ import annotations

import numpy as np

from ..schedule import GATHER, REDUCE, Schedule

__all__ = ["native_schedule", "SHORT_MSG_SIZE", "algorithm_for"]

#: MPIR_CVAR_ALLREDUCE_SHORT_MSG_SIZE's default (bytes)
SHORT_MSG_SIZE = 2048


def algorithm_for(nranks, nbytes, itemsize=4):
    """``"recursive_doubling"`` or ``"reduce_scatter_allgather"``: MPICH's pick."""
    pof2 = 1 << (int(nranks).bit_length() - 1)
    count = nbytes // itemsize
    if nbytes <= SHORT_MSG_SIZE or count < pof2:
        return "recursive_doubling"
    return "reduce_scatter_allgather"


def native_schedule(topology, nbytes, itemsize=4):
    """The MPI library's allreduce of ``nbytes`` on ``topology`` (a Topology) as a Schedule
    named ``native`` (``meta["mpi_algorithm"]`` says which algorithm)."""
    n = topology.nranks
    pof2 = 1 << (n.bit_length() - 1)
    rem = n - pof2
    # the pof2 ranks left after the pairing; virtual rank v is real rank real[v]
    real = [2 * v + 1 if v < rem else v + rem for v in range(pof2)]
    algo = algorithm_for(n, nbytes, itemsize)
    rows = []
    step = 0
    if rem:
        for r in range(0, 2 * rem, 2):
            rows.append((REDUCE, 0, r, r + 1, 0, pof2))
        step = 1
    if algo == "recursive_doubling":
        # the whole buffer each round; one chunk per virtual rank so that bytes are counted
        mask = 1
        while mask < pof2:
            for v in range(pof2):
                rows.append((REDUCE, step, real[v], real[v ^ mask], 0, pof2))
            step += 1
            mask <<= 1
        gstep = 0
        owner = np.zeros(pof2, np.int64)
    else:
        held = {v: (0, pof2) for v in range(pof2)}
        mask = 1
        while mask < pof2:
            for v in range(pof2):
                lo, hi = held[v]
                mid = (lo + hi) // 2
                low = v < (v ^ mask)
                keep, give = ((lo, mid), (mid, hi)) if low else ((mid, hi), (lo, mid))
                rows.append((REDUCE, step, real[v], real[v ^ mask], *give))
                held[v] = keep
            step += 1
            mask <<= 1
        owner = np.zeros(pof2, np.int64)
        for v, (lo, _) in held.items():
            owner[lo] = real[v]
        gstep = 0
        mask = pof2 >> 1
        while mask >= 1:
            new = {}
            for v in range(pof2):
                lo, hi = held[v]
                rows.append((GATHER, gstep, real[v], real[v ^ mask], lo, hi))
                plo, phi = held[v ^ mask]
                new[v] = (min(lo, plo), max(hi, phi))
            held = new
            gstep += 1
            mask >>= 1
    if rem:
        for r in range(0, 2 * rem, 2):
            rows.append((GATHER, gstep, r + 1, r, 0, pof2))
    cols = [np.array(c, np.int64) for c in zip(*rows)]
    return Schedule("native", topology.spec, n, pof2, owner, *cols,
                    route=np.zeros(len(rows), np.int64),
                    meta={"mpi_algorithm": algo, "mpi_library": "MPICH"})
