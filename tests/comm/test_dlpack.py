"""Buffers exported through DLPack: what mpi4py accepts, mtcoll accepts, and a faulty or
unreadable export is an exception on every rank, never a crash or a hang.

The exporter here builds DLPack capsules itself (legacy ``dltensor`` and versioned
``dltensor_versioned`` with its read-only flag) over a numpy array it keeps alive, with
element types numpy cannot import (bfloat16, float8, bool packed in bits, complex32). For each
case the oracle is plain mpi4py on the same input: the same result, or the same exception type.
"""

from __future__ import annotations

import ctypes

import numpy as np
import pytest
from mpi4py import MPI

from _comms import with_algorithm
from mtcoll.plan import ALGORITHMS


class _Version(ctypes.Structure):
    _fields_ = [("major", ctypes.c_uint32), ("minor", ctypes.c_uint32)]


class _DType(ctypes.Structure):
    _fields_ = [("code", ctypes.c_uint8), ("bits", ctypes.c_uint8), ("lanes", ctypes.c_uint16)]


class _Tensor(ctypes.Structure):
    _fields_ = [("data", ctypes.c_void_p), ("device_type", ctypes.c_int),
                ("device_id", ctypes.c_int32), ("ndim", ctypes.c_int32), ("dtype", _DType),
                ("shape", ctypes.POINTER(ctypes.c_int64)),
                ("strides", ctypes.POINTER(ctypes.c_int64)), ("byte_offset", ctypes.c_uint64)]


class _Managed(ctypes.Structure):
    _fields_ = [("dl_tensor", _Tensor), ("manager_ctx", ctypes.c_void_p),
                ("deleter", ctypes.c_void_p)]


class _ManagedVersioned(ctypes.Structure):
    _fields_ = [("version", _Version), ("manager_ctx", ctypes.c_void_p),
                ("deleter", ctypes.c_void_p), ("flags", ctypes.c_uint64),
                ("dl_tensor", _Tensor)]


_new_capsule = ctypes.pythonapi.PyCapsule_New
_new_capsule.restype = ctypes.py_object
_new_capsule.argtypes = [ctypes.c_void_p, ctypes.c_char_p, ctypes.c_void_p]

READ_ONLY = 1  # DLPack's DLPACK_FLAG_BITMASK_READ_ONLY
# a deleter that does nothing (the exporter owns the memory): DLPack allows NULL there, but
# a consumer may call it unconditionally
_NOOP_DELETER = ctypes.CFUNCTYPE(None, ctypes.c_void_p)(lambda _: None)


class Export:
    """A host-memory DLPack exporter of ``array``'s bytes as elements of DLPack type
    (``code``, ``bits``). The exporter owns the memory and the structures and must
    outlive every use (the tests keep it); the deleter does nothing. ``readonly`` marks versioned exports read-only;
    ``fail`` makes ``__dlpack__`` raise."""

    def __init__(self, array, code, bits, readonly=False, fail=False):
        self.array = np.ascontiguousarray(array)
        self.code, self.bits, self.readonly, self.fail = code, bits, readonly, fail
        # one element per byte at least: a consumer may take 1-bit elements as bytes, and
        # must then still stay inside the memory
        self.count = self.array.nbytes // max(1, bits // 8)
        self.keep = []

    def __dlpack_device__(self):
        return (1, 0)  # kDLCPU

    def _tensor(self, t):
        shape = (ctypes.c_int64 * 1)(self.count)
        self.keep.append(shape)
        t.data = self.array.ctypes.data
        t.device_type, t.device_id, t.ndim = 1, 0, 1
        t.dtype = _DType(self.code, self.bits, 1)
        t.shape, t.strides, t.byte_offset = shape, None, 0

    def __dlpack__(self, stream=None, max_version=None, dl_device=None, copy=None):
        if self.fail:
            raise RuntimeError("this exporter always fails")
        if max_version is not None and tuple(max_version) >= (1, 0):
            m = _ManagedVersioned()
            m.version = _Version(1, 0)
            m.flags = READ_ONLY if self.readonly else 0
            name = b"dltensor_versioned"
        else:
            m = _Managed()
            name = b"dltensor"
        self._tensor(m.dl_tensor)
        m.manager_ctx = None
        m.deleter = ctypes.cast(_NOOP_DELETER, ctypes.c_void_p).value
        self.keep.append(m)
        self.keep.append(name)  # PyCapsule_New keeps the pointer, not a copy of the name
        return _new_capsule(ctypes.addressof(m), name, None)


# (code, bits, numpy dtype of the memory) of DLPack element types numpy cannot import
UNREADABLE = {
    "bfloat16": (4, 16, np.uint16),
    "float8": (7, 8, np.uint8),
    "bool-bits": (6, 1, np.uint8),
    "complex32": (5, 32, np.uint32),
}


def _outcome(fn):
    """(exception type name, None) or (None, result bytes)."""
    try:
        return None, fn()
    except Exception as e:  # the oracle compares the type with mpi4py's
        return type(e).__name__, None


def _allreduce_bytes(comm, export, inplace):
    if inplace:
        comm.Allreduce(MPI.IN_PLACE, export, op=MPI.SUM)
        return export.array.tobytes()
    out = np.zeros_like(export.array)
    comm.Allreduce(export, Export(out, export.code, export.bits), op=MPI.SUM)
    return out.tobytes()


@pytest.fixture(params=("auto",) + tuple(ALGORITHMS))
def mt(request, comm):
    """An mtcoll Comm with each algorithm in turn (skipped where it does not fit)."""
    c = with_algorithm(comm, request.param)
    yield c
    c.Free()


@pytest.fixture(params=("auto", "multitree"))
def mt_library(request, comm):
    """For the exports only the MPI library takes: the algorithm does not matter, two do."""
    c = with_algorithm(comm, request.param)
    yield c
    c.Free()


@pytest.mark.mpi
@pytest.mark.parametrize("inplace", [False, True], ids=["out-of-place", "in-place"])
def test_float64_export_reduces_like_mpi4py(comm, mt, inplace):
    """A writable float64 export: in place too (it is writable), mtcoll's result equal to
    mpi4py's, on every algorithm."""
    rank = comm.Get_rank()
    base = np.arange(70_000, dtype=np.float64) * (rank + 1)
    want = _allreduce_bytes(comm, Export(base.copy(), 2, 64), inplace)
    got = _allreduce_bytes(mt, Export(base.copy(), 2, 64), inplace)
    assert got == want


@pytest.mark.mpi
def test_float32_export_allgather_in_place(comm, mt):
    """``Allgather(MPI.IN_PLACE, export)`` writes the export as mpi4py does."""
    size, rank = comm.Get_size(), comm.Get_rank()
    k = 5000
    want = np.zeros(size * k, np.float32)
    want[rank * k:(rank + 1) * k] = rank + 0.5
    got = want.copy()
    comm.Allgather(MPI.IN_PLACE, Export(want, 2, 32))
    mt.Allgather(MPI.IN_PLACE, Export(got, 2, 32))
    assert np.array_equal(got, want) and np.all(got[::k] == np.arange(size) + 0.5)


@pytest.mark.mpi
@pytest.mark.parametrize("kind", sorted(UNREADABLE))
@pytest.mark.parametrize("call", ["Allreduce", "Reduce_scatter_block", "Allgather"])
def test_unreadable_element_type_behaves_as_mpi4py(comm, mt_library, kind, call):
    """An element type numpy cannot import: mtcoll hands the call to mpi4py, so the outcome
    (result or exception type) is mpi4py's own, and the process survives."""
    code, bits, mem = UNREADABLE[kind]
    size = comm.Get_size()
    n = 64 * size

    def run(c):
        send = Export(np.ones(n, mem), code, bits)
        recv_len = {"Allreduce": n, "Reduce_scatter_block": n // size,
                    "Allgather": n * size}[call]
        recv = Export(np.zeros(recv_len, mem), code, bits)
        if call == "Allreduce":
            c.Allreduce(send, recv, op=MPI.SUM)
        elif call == "Reduce_scatter_block":
            c.Reduce_scatter_block(send, recv, op=MPI.SUM)
        else:
            c.Allgather(send, recv)
        return recv.array.tobytes()

    want = _outcome(lambda: run(comm))
    got = _outcome(lambda: run(mt_library))
    assert got == want
    comm.Barrier()  # every rank still here, none crashed


@pytest.mark.mpi
def test_read_only_export_is_refused_as_by_mpi4py(comm, mt_library):
    """A versioned export flagged read-only as the receive buffer: mpi4py's BufferError,
    raised by mtcoll too, and the exporter's memory untouched."""
    size = comm.Get_size()

    def run(c):
        data = np.ones(8 * size)
        exp = Export(data, 2, 64, readonly=True)
        try:
            c.Allreduce(MPI.IN_PLACE, exp, op=MPI.SUM)
        finally:
            assert np.all(data == 1.0)
        return data.tobytes()

    want = _outcome(lambda: run(comm))
    got = _outcome(lambda: run(mt_library))
    assert got == want
    assert want[0] is not None and "Buffer" in want[0]  # mpi4py refuses it
    comm.Barrier()


@pytest.mark.mpi
@pytest.mark.parametrize("side", ["sendbuf", "recvbuf"])
def test_failing_exporter_raises_on_every_rank(comm, mt_library, side):
    """An exporter whose ``__dlpack__`` raises: the same exception as with mpi4py, on every
    rank, and the communicator works afterwards."""
    size = comm.Get_size()

    def run(c):
        good = Export(np.ones(4 * size), 2, 64)
        bad = Export(np.ones(4 * size), 2, 64, fail=True)
        args = (bad, good) if side == "sendbuf" else (good, bad)
        c.Allreduce(*args, op=MPI.SUM)
        return b""

    want = _outcome(lambda: run(comm))
    got = _outcome(lambda: run(mt_library))
    assert got == want and want[0] is not None
    x = np.ones(3)
    mt_library.Allreduce(MPI.IN_PLACE, x, op=MPI.SUM)
    assert np.all(x == size)
