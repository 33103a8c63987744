"""Buffer arguments and argument checks of :class:`mtcoll.Comm`'s calls.

:func:`prepare` turns the arguments of one call into a :class:`Call`: flat numpy views of the
buffers, the dtype, the op's ufunc, the element count. Everything here happens before any
message is sent, and every error names the argument and the rank.

Buffers are what mpi4py accepts (its ``BufSpec`` grammar): an object exporting the buffer
protocol (numpy arrays and scalars, ``bytearray``, ``array.array``, ``memoryview``), DLPack
(``__dlpack__``, host memory) or ``__cuda_array_interface__`` (host memory), alone or as
``[buf, datatype]``, ``[buf, count, datatype]`` or ``[buf, (count, displ), datatype]``;
``sendbuf=None`` or ``MPI.IN_PLACE`` is in place, and so is ``sendbuf is recvbuf`` for the
reductions (mpi4py >= 4.2's rule). What mpi4py rejects raises mpi4py's exception type (a
read-only receive buffer: BufferError; sizes or datatypes that differ: ValueError). On top of
mpi4py: non-contiguous numpy arrays are copied in and out.
"""

from __future__ import annotations

import ctypes

import numpy as np
from mpi4py import MPI
from mpi4py.util import dtlib

from .. import _ops

__all__ = ["Buf", "Call", "prepare", "parse_buffer", "ReadOnlyBufferError",
           "BufferMismatchError"]

REDUCTIONS = ("Allreduce", "Iallreduce", "Reduce_scatter_block")


class ReadOnlyBufferError(BufferError, ValueError):
    """A receive buffer that is read-only: BufferError as in mpi4py (and a ValueError, as
    mtcoll raised before it followed mpi4py here)."""


class BufferMismatchError(ValueError, TypeError):
    """Send and receive buffers of different datatypes: ValueError as in mpi4py (and a
    TypeError, as mtcoll raised before it followed mpi4py here)."""


class Buf:
    """A buffer argument as a flat array (``flat``); ``orig`` is set when ``flat`` is a copy
    of a non-contiguous array, which :meth:`copy_back` refreshes."""

    __slots__ = ("flat", "orig", "full")

    def __init__(self, flat, orig=None, full=None):
        self.flat, self.orig, self.full = flat, orig, full

    def copy_back(self):
        if self.orig is not None:
            self.orig[...] = self.full.reshape(self.orig.shape)


class _HostArray:
    # A ``__cuda_array_interface__`` (host memory, as mpi4py takes it) seen through numpy's
    # ``__array_interface__``: the two dictionaries share their keys.
    def __init__(self, cai, owner):
        self.__array_interface__ = {"shape": tuple(cai["shape"]), "typestr": cai["typestr"],
                                    "data": tuple(cai["data"]), "strides": cai.get("strides"),
                                    "version": 3}
        self.owner = owner  # keeps the exporter alive as long as the array


class _DLDataType(ctypes.Structure):
    _fields_ = [("code", ctypes.c_uint8), ("bits", ctypes.c_uint8), ("lanes", ctypes.c_uint16)]


class _DLTensorHead(ctypes.Structure):
    # the first fields of DLPack's DLTensor, as far as the dtype (data, device, ndim, dtype)
    _fields_ = [("data", ctypes.c_void_p), ("device_type", ctypes.c_int),
                ("device_id", ctypes.c_int32), ("ndim", ctypes.c_int32),
                ("dtype", _DLDataType)]


# DLManagedTensorVersioned puts version (2 x uint32), manager_ctx, deleter and flags (uint64)
# before its DLTensor; the legacy DLManagedTensor starts with it
_VERSIONED_HEAD = 8 + 2 * ctypes.sizeof(ctypes.c_void_p) + 8
_capsule_pointer = ctypes.pythonapi.PyCapsule_GetPointer
_capsule_pointer.restype, _capsule_pointer.argtypes = ctypes.c_void_p, [ctypes.py_object,
                                                                        ctypes.c_char_p]
_capsule_name = ctypes.pythonapi.PyCapsule_GetName
_capsule_name.restype, _capsule_name.argtypes = ctypes.c_char_p, [ctypes.py_object]
_capsule_valid = ctypes.pythonapi.PyCapsule_IsValid
_capsule_valid.restype, _capsule_valid.argtypes = ctypes.c_int, [ctypes.py_object,
                                                                 ctypes.c_char_p]

# DLPack's (type code, bits) -> numpy dtype, for the types the executor reduces; bfloat16,
# float8, bool packed in bits, complex32 and the rest are left to the MPI library
_DLPACK_KINDS = {0: "i", 1: "u", 2: "f", 5: "c", 6: "b"}
_KDLCPU, _KDLCUDAHOST, _KDLROCMHOST = 1, 3, 11


def _dlpack_dtype(buf):
    """The numpy dtype of a DLPack export in host memory, read from the capsule's header
    without consuming it (its own destructor frees it), or None for anything else: another
    device, a type numpy or the executor lacks, an exporter that raises. mpi4py reads the
    memory itself (:func:`_as_array`); mtcoll only needs the element type."""
    try:
        capsule = buf.__dlpack__()
        name = _capsule_name(capsule)
        if name not in (b"dltensor", b"dltensor_versioned") \
                or not _capsule_valid(capsule, name):
            return None
        head = _capsule_pointer(capsule, name) + (_VERSIONED_HEAD if name.endswith(b"ned")
                                                  else 0)
        t = _DLTensorHead.from_address(head)
        kind, bits, lanes = _DLPACK_KINDS.get(t.dtype.code), t.dtype.bits, t.dtype.lanes
        device = t.device_type
        del capsule
    except Exception:  # the exporter's fault: mpi4py calls it again and reports it
        return None
    if device not in (_KDLCPU, _KDLCUDAHOST, _KDLROCMHOST) or kind is None or lanes != 1:
        return None
    if kind == "b":
        return np.dtype(np.bool_) if bits == 8 else None
    if bits % 8 or bits not in (8, 16, 32, 64, 128):
        return None
    try:
        dtype = np.dtype(f"{kind}{bits // 8}")
    except TypeError:
        return None
    return dtype if _ops.simple_dtype(dtype) else None


def _as_array(buf, where, writable):
    """``buf`` as a numpy array sharing its memory (buffer protocol, DLPack or CAI), or None
    when mtcoll cannot read it and the MPI library (through mpi4py's own parsing) must: an
    exporter numpy does not take, a DLPack type it lacks, a faulty exporter."""
    if isinstance(buf, np.ndarray):
        return buf
    try:
        view = memoryview(buf)
    except TypeError:
        view = None
    if view is not None:
        try:
            return np.asarray(view)
        except (ValueError, NotImplementedError, BufferError, TypeError):
            return None  # a format numpy does not read: mpi4py may
    if hasattr(buf, "__dlpack__"):
        dtype = _dlpack_dtype(buf)
        if dtype is None:
            return None
        try:  # the memory as mpi4py sees it (its checks, its read-only rule)
            mem = MPI.buffer.frombuffer(buf, readonly=not writable)
        except Exception:
            return None  # mpi4py raises it again in the library's call
        if mem.nbytes % dtype.itemsize:
            return None
        return np.frombuffer(mem, dtype=dtype)
    cai = getattr(buf, "__cuda_array_interface__", None)
    if cai is not None:
        try:
            return np.asarray(_HostArray(cai, buf))
        except (KeyError, TypeError, ValueError):
            return None
    raise TypeError(f"{where}: expected a buffer (an object with the buffer protocol, DLPack "
                    f"or __cuda_array_interface__, or a [buf, datatype] list), got "
                    f"{type(buf).__name__}")


def parse_buffer(spec, name, rank, writable):
    """Parse an mpi4py buffer spec (``buf``, ``[buf, datatype]``, ``[buf, count, datatype]``,
    ``[buf, (count, displ), datatype]``). Returns a :class:`Buf`, or None when only the MPI
    library can handle it (a derived or pair datatype)."""
    where = f"{name} (rank {rank})"
    buf, count, displ, dt = spec, None, 0, None
    if isinstance(spec, (list, tuple)):
        if not 1 <= len(spec) <= 3:
            raise TypeError(f"{where}: a buffer spec is buf, [buf, datatype] or "
                            f"[buf, count, datatype], got a sequence of {len(spec)}")
        if isinstance(spec[0], (int, float, complex)) and not isinstance(spec[0], np.generic):
            # (numpy scalars, np.float64 a float among them, export the buffer protocol)
            raise TypeError(f"{where}: expected a buffer (numpy array, bytearray, "
                            f"memoryview...), got a {type(spec).__name__} of numbers")
        buf, rest = spec[0], list(spec[1:])
        if len(rest) == 2:
            count, dt = rest
        elif len(rest) == 1:
            if isinstance(rest[0], (int, np.integer, tuple, list)):
                count = rest[0]
            else:
                dt = rest[0]
        if isinstance(count, (tuple, list)):
            if len(count) != 2:
                raise TypeError(f"{where}: expected (count, displacement), got {count!r}")
            count, displ = count
    npdt = None
    if dt is not None:
        if isinstance(dt, MPI.Datatype):
            if dt == MPI.DATATYPE_NULL:
                raise TypeError(f"{where}: MPI.DATATYPE_NULL is not a datatype")
            if not dt.is_predefined:
                return None
            try:
                npdt = np.dtype(dtlib.to_numpy_dtype(dt))
            except (ValueError, TypeError):
                return None
        else:
            try:
                npdt = np.dtype(dt)
            except TypeError:
                raise TypeError(f"{where}: {dt!r} is not a datatype") from None
        if not _ops.simple_dtype(npdt):
            return None
    if buf is MPI.IN_PLACE or buf is MPI.BOTTOM:
        raise TypeError(f"{where}: MPI.IN_PLACE/MPI.BOTTOM are not accepted here")
    if buf is None:
        return None  # [None, datatype]: mpi4py's zero-size message, the library's to run
    arr = _as_array(buf, where, writable)
    if arr is None:
        return None
    if writable and not arr.flags.writeable:
        raise ReadOnlyBufferError(f"{where} is read-only")
    if npdt is None and not _ops.simple_dtype(arr.dtype):
        # mpi4py maps no other dtype to an MPI datatype by itself (it would raise a KeyError
        # or BufferError naming neither the argument nor the rank)
        raise TypeError(f"{where}: dtype {arr.dtype} has no predefined MPI datatype "
                        f"(object, structured, byte-swapped, string, void and datetime arrays "
                        f"need [buf, datatype] with an MPI datatype, or a conversion)")
    orig = full = None
    if arr.flags.c_contiguous or arr.flags.f_contiguous:
        flat = arr.ravel(order="K")  # a view, in memory order (what MPI would see)
    else:
        orig = arr
        flat = full = np.ascontiguousarray(arr).ravel()
    if npdt is not None and npdt != flat.dtype:
        if orig is not None:
            raise TypeError(f"{where}: cannot reinterpret a non-contiguous array as {npdt}")
        if flat.nbytes % npdt.itemsize:
            raise ValueError(f"{where}: {flat.nbytes} bytes is not a whole number of "
                             f"{npdt.name} elements")
        flat = flat.view(np.uint8).view(npdt)
    if count is not None:
        count, displ = int(count), int(displ)
        if count < 0 or displ < 0 or displ + count > flat.size:
            raise ValueError(f"{where}: count {count} at displacement {displ} does not fit "
                             f"in its {flat.size} elements")
        flat = flat[displ:displ + count]
    return Buf(flat, orig, full)


class Call:
    """One validated call: everything decided before any message is sent.

    ``raw`` holds the arguments as given (``sendbuf`` None or the same object as ``recvbuf``
    already replaced by ``MPI.IN_PLACE``); ``send`` is None for an in-place call; ``recv`` and
    ``send`` are None together for what only the MPI library can run (derived datatypes,
    zero-size ``[None, datatype]``, exporters mtcoll cannot read).
    """

    __slots__ = ("kind", "send", "recv", "raw", "count", "dtype", "op", "ufunc", "algorithm",
                 "why", "nbytes")

    def __init__(self, kind):
        self.kind = kind
        self.send = self.recv = self.raw = self.dtype = self.op = self.ufunc = None
        self.count = -1
        self.algorithm = "native"
        self.why = ""
        self.nbytes = 0


def prepare(kind, sendbuf, recvbuf, op, rank, size):
    """Check the arguments of a call of ``kind`` on rank ``rank`` of ``size``; a :class:`Call`
    with ``algorithm`` still to be chosen (``why`` says when the MPI library must run it)."""
    c = Call(kind)
    if sendbuf is None or (sendbuf is recvbuf and kind in REDUCTIONS):
        sendbuf = MPI.IN_PLACE  # mpi4py's InPlace: None; and >= 4.2, the same object
    c.raw = (sendbuf, recvbuf)
    if kind != "Allgather":
        if not isinstance(op, MPI.Op) or op == MPI.OP_NULL:
            raise TypeError(f"op (rank {rank}) must be an MPI.Op, got {op!r}")
        c.op = op
    if recvbuf is MPI.IN_PLACE or recvbuf is None:
        raise TypeError(f"recvbuf (rank {rank}) must be a buffer, got {recvbuf!r}")
    c.recv = parse_buffer(recvbuf, "recvbuf", rank, writable=True)
    if sendbuf is not MPI.IN_PLACE:
        c.send = parse_buffer(sendbuf, "sendbuf", rank, writable=False)
        if c.send is None:
            c.recv = None  # (both None: the library takes the arguments as given)
    if c.recv is None:
        c.send = None
        c.why = "a buffer or datatype only the MPI library reads"
        return c
    recv = c.recv.flat
    c.dtype = recv.dtype
    if c.send is not None:
        send = c.send.flat
        if send.dtype != recv.dtype:
            raise BufferMismatchError(f"recvbuf (rank {rank}) has dtype {recv.dtype.name} but "
                                      f"sendbuf has {send.dtype.name}")
        if send.size and np.may_share_memory(send, recv):
            raise ValueError(f"sendbuf and recvbuf (rank {rank}) overlap; pass "
                             f"MPI.IN_PLACE as sendbuf to reduce in place")
        want = {"Allreduce": send.size, "Iallreduce": send.size,
                "Reduce_scatter_block": send.size // size if send.size % size == 0 else None,
                "Allgather": send.size * size}[kind]
        if want is None:
            raise ValueError(f"sendbuf (rank {rank}) holds {send.size} elements, not a "
                             f"multiple of the {size} ranks")
        if recv.size != want:
            what = "too small" if recv.size < want else "too large"
            raise ValueError(f"recvbuf (rank {rank}) is {what}: it holds {recv.size} "
                             f"elements, the call needs {want}")
    elif kind in ("Reduce_scatter_block", "Allgather") and recv.size % size:
        raise ValueError(f"recvbuf (rank {rank}) holds {recv.size} elements, not a "
                         f"multiple of the {size} ranks (MPI.IN_PLACE)")
    # count: the elements of the whole buffer a schedule runs on (for Allgather the
    # gathered result, for Reduce_scatter_block the input)
    c.count = c.send.flat.size if c.send is not None and kind != "Allgather" else recv.size
    c.nbytes = c.count * c.dtype.itemsize
    if kind != "Allgather":
        c.ufunc = _ops.lookup(op, c.dtype)  # TypeError for combinations MPI leaves undefined
        if c.ufunc is None:
            c.why = f"op {_ops.op_name(op) or 'user-defined'} or dtype {c.dtype}"
    return c
