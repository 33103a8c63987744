"""The agreement check (``MTCOLL_CHECK=1``): before a call, every rank learns every other
rank's call, so that a disagreement raises the same error everywhere instead of hanging, and a
rank that never makes the call is named (with ``MTCOLL_TIMEOUT``), not waited for."""

from __future__ import annotations

import json
import math
import time
import zlib

import numpy as np
from mpi4py import MPI

from .. import _ops, execute
from ._errors import ABANDONED, StallError
from ._progress import poll

__all__ = ["agree", "absent", "CALLS", "PRESENCE_TAG"]

CALLS = ("Allreduce", "Iallreduce", "Reduce_scatter_block", "Allgather")
#: The tag of :func:`absent`'s messages on the check communicator (the checks use the others).
PRESENCE_TAG = 32767


def _code(text):
    return zlib.crc32(str(text).encode()) & 0x7FFFFFFF


# The agreement check's text per rank (UTF-8 JSON, zero-padded): the call's fields, or the error
# its arguments raised, shortened to fit.
_CHECK_TEXT = 1024


def _fit_json(fields, limit):
    """``fields`` (a dict of str, int or None) as JSON in at most ``limit`` bytes: the longest
    string is shortened (ending in "...") until it fits."""
    fields = dict(fields)
    while True:
        data = json.dumps(fields).encode()
        if len(data) <= limit:
            return data
        texts = [k for k, v in fields.items() if isinstance(v, str) and len(v) > 3]
        if not texts:
            return json.dumps({"error": "ValueError", "message": "(too long)"}).encode()
        k = max(texts, key=lambda k: len(fields[k]))
        v = fields[k]
        cut = len(v) - 4
        while cut > 0 and len(json.dumps(v[:cut] + "...").encode()) > \
                len(json.dumps(v).encode()) - (len(data) - limit):
            cut = cut * 3 // 4  # escaped characters take up to 6 bytes each
        fields[k] = v[:max(0, cut)] + "..."


def _unfit_json(row):
    data = row.tobytes().rstrip(b"\0")
    try:
        return json.loads(data.decode())
    except ValueError:
        return {}


def agree(self, kind, call, err, timeout):
    """Check that every rank of :class:`~mtcoll.Comm` ``self`` makes call ``kind`` with the
    same arguments (``call``, or ``err``: the error its arguments raised on this rank)."""
    # Every rank sends a descriptor of its call to every other rank on the check
    # communicator (nonblocking, tagged with the check's number) and waits for theirs: up
    # to ``timeout`` seconds, so a rank that never makes the call is named, not waited for.
    # (One Allgather would be cheaper, but cannot tell who is missing.) A descriptor is a
    # row of numbers to compare and a text to report (the call's fields, or the error its
    # arguments raised): whatever a rank concludes from the rows it got, it needs nothing
    # more from the others, so a rank that gave up waiting cannot hold the rest.
    fields = ("validation", "call", "count", "datatype", "op", "algorithm", "topology")
    if err is not None:
        mine = [0, CALLS.index(kind), -1, -1, -1, -1, -1]
        text = {"error": type(err).__name__, "message": str(err)}
    else:
        dcode = _ops.dtype_code(call.dtype) if call.dtype is not None else 0
        mine = [1, CALLS.index(kind), call.count, dcode, _ops.op_code(call.op),
                _code(self.algorithm), _code(self.network.spec)]
        text = {"call": kind, "count": call.count,
                "datatype": None if call.dtype is None else call.dtype.name,
                "op": _ops.op_name(call.op) if call.op is not None else None,
                "algorithm": self.algorithm, "topology": self.network.spec}
    self._nchecks += 1
    tag = self._nchecks % PRESENCE_TAG  # MPI guarantees tags up to 32767; the last is taken
    size, rank = self._size, self._rank
    head = 8 * len(fields)
    rows = np.zeros((size, head + _CHECK_TEXT), dtype=np.uint8)
    rows[rank, :head] = np.array(mine, dtype=np.int64).view(np.uint8)
    packed = _fit_json(text, _CHECK_TEXT)
    rows[rank, head:head + len(packed)] = np.frombuffer(packed, dtype=np.uint8)
    peers = [r for r in range(size) if r != rank]
    recvs = [self._chk.Irecv(rows[r], r, tag) for r in peers]
    sends = [self._chk.Isend(rows[rank], r, tag) for r in peers]
    if timeout is None and self.wait == "busy" and not execute.running():
        MPI.Request.Waitall(recvs + sends)
    else:
        deadline = math.inf if timeout is None else time.monotonic() + timeout
        reqs = recvs + sends
        try:
            agreed = poll(lambda: MPI.Request.Testall(reqs), deadline, self.wait == "sleep")
        except BaseException:  # e.g. another call's error, raised by the progress made
            ABANDONED.append((reqs, rows))  # MPI may still write or read them
            self._break(f"{kind} agreement check interrupted on rank {rank}")
            raise
        if not agreed:
            missing = []
            for r, q in zip(peers, recvs):
                if q:  # not completed yet: cancel it (it may still complete meanwhile)
                    q.Cancel()
                    st = MPI.Status()
                    q.Wait(st)
                    if st.Is_cancelled():
                        missing.append(r)
            ABANDONED.append((sends, rows))  # the sends may still be read
            if missing:
                came = [r for r in range(size) if r not in missing]
                self._break(f"{kind} agreement check timed out on rank {rank}")
                raise StallError(
                    f"mtcoll {kind} on rank {rank}: rank(s) {missing} did not make this "
                    f"call within MTCOLL_TIMEOUT={timeout:g} s (MTCOLL_CHECK agreement "
                    f"check {self._nchecks}; ranks {came} did). The Comm is now broken: "
                    f"free it and make a new one, or end the job", kind, timeout, missing)
            # every descriptor came in after all (only our sends are not yet taken):
            # judge them like the others
    every = rows[:, :head].copy().view(np.int64)
    bad = np.flatnonzero(every[:, 0] == 0).tolist()
    if bad:
        if err is not None:
            raise err
        got = _unfit_json(rows[bad[0], head:])
        cls = TypeError if got.get("error") == "TypeError" else ValueError
        raise cls(f"mtcoll {kind}: rank(s) {bad} rejected their arguments; "
                  f"rank {bad[0]}: {got.get('message', '?')}")
    diff = [j for j in range(1, len(fields)) if (every[:, j] != every[0, j]).any()]
    if diff:
        descs = {r: _unfit_json(rows[r, head:]) for r in range(size)}
        parts = []
        for j in diff:
            f = fields[j]
            others = np.flatnonzero(every[:, j] != every[0, j]).tolist()
            shown = ", ".join(f"rank {r}: {descs[r].get(f)!r}" for r in others[:8])
            parts.append(f"{f}: rank 0 has {descs[0].get(f)!r} but ranks {others} differ "
                         f"({shown})")
        raise ValueError(f"mtcoll {kind}: the ranks disagree on " + "; ".join(parts))



def absent(self, call_number, grace):
    """The ranks of :class:`~mtcoll.Comm` ``self`` that did not join its call ``call_number``.

    Run by a rank whose call stalled (``MTCOLL_TIMEOUT``): it tells every other rank "I am
    stalled in call ``call_number``" and listens up to ``grace`` seconds for the same from
    them. Every rank that made the call stalls too (each result of these calls needs every
    rank's input), so the ranks not heard from are those that did not join -- a rank that
    failed on its own arguments, say -- not merely the neighbours whose messages are missing.
    The messages left unmatched stay in ``ABANDONED`` (the Comm is broken afterwards).
    """
    size, rank = self._size, self._rank
    peers = [r for r in range(size) if r != rank]
    mine = np.array([call_number], dtype=np.int64)
    got = np.full((size, 1), -1, dtype=np.int64)
    recvs = [self._chk.Irecv(got[r], r, PRESENCE_TAG) for r in peers]
    sends = [self._chk.Isend(mine, r, PRESENCE_TAG) for r in peers]
    deadline = time.monotonic() + grace
    poll(lambda: MPI.Request.Testall(recvs), deadline, sleep=True)
    for q in recvs:
        if q:
            q.Cancel()
    ABANDONED.append((recvs, sends, got, mine))
    return [r for r in peers if got[r, 0] != call_number]
