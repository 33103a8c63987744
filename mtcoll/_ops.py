"""Reduction operators and element types: MPI's predefined ops as numpy ufuncs.

MPI defines each predefined reduction only on some classes of types (MPI-4.1, section 6.9.2):

=========================  =====================================================
op                         type classes
=========================  =====================================================
SUM, PROD                  integer, floating point, complex
MIN, MAX                   integer, floating point
LAND, LOR, LXOR            integer, logical (bool)
BAND, BOR, BXOR            integer (bytes are unsigned 8-bit integers here)
=========================  =====================================================

The logical ops on integers give 0 or 1, as in C and in MPI. Anything else -- a user-defined
op, MINLOC/MAXLOC, a structured or byte-swapped dtype -- is not ours: :func:`lookup` returns
None and the caller hands the call to the MPI library.
"""

from __future__ import annotations

import zlib

import numpy as np
from mpi4py import MPI

__all__ = ["OP_NAMES", "lookup", "op_name", "op_code", "type_class", "simple_dtype",
           "dtype_code"]

_INTEGER, _FLOAT, _COMPLEX, _LOGICAL = "integer", "floating point", "complex", "logical"

# name -> (MPI op, numpy ufunc, type classes MPI defines it on)
_TABLE = {
    "SUM": (MPI.SUM, np.add, (_INTEGER, _FLOAT, _COMPLEX)),
    "PROD": (MPI.PROD, np.multiply, (_INTEGER, _FLOAT, _COMPLEX)),
    "MIN": (MPI.MIN, np.minimum, (_INTEGER, _FLOAT)),
    "MAX": (MPI.MAX, np.maximum, (_INTEGER, _FLOAT)),
    "LAND": (MPI.LAND, np.logical_and, (_INTEGER, _LOGICAL)),
    "LOR": (MPI.LOR, np.logical_or, (_INTEGER, _LOGICAL)),
    "LXOR": (MPI.LXOR, np.logical_xor, (_INTEGER, _LOGICAL)),
    "BAND": (MPI.BAND, np.bitwise_and, (_INTEGER,)),
    "BOR": (MPI.BOR, np.bitwise_or, (_INTEGER,)),
    "BXOR": (MPI.BXOR, np.bitwise_xor, (_INTEGER,)),
}
OP_NAMES = tuple(_TABLE)
_BY_HANDLE = {entry[0].py2f(): name for name, entry in _TABLE.items()}

_CLASS_OF_KIND = {"i": _INTEGER, "u": _INTEGER, "f": _FLOAT, "c": _COMPLEX, "b": _LOGICAL}


def op_name(op):
    """``"SUM"`` for ``MPI.SUM`` and so on; None for ops outside the table (user ops, MINLOC)."""
    if not isinstance(op, MPI.Op) or op == MPI.OP_NULL:
        return None
    return _BY_HANDLE.get(op.py2f())


def op_code(op):
    """A small integer naming the op, the same on every rank (for agreement checks)."""
    name = op_name(op)
    return OP_NAMES.index(name) + 1 if name else 0


def simple_dtype(dtype):
    """True for the dtypes the executor reduces itself: native-order bool, int, float, complex."""
    dtype = np.dtype(dtype)
    return (dtype.kind in _CLASS_OF_KIND and dtype.isnative and dtype.fields is None
            and dtype.subdtype is None)


def type_class(dtype):
    """MPI's type class of a simple dtype (``"integer"``, ``"logical"``...), else None."""
    dtype = np.dtype(dtype)
    return _CLASS_OF_KIND.get(dtype.kind) if simple_dtype(dtype) else None


def dtype_code(dtype):
    """A small integer naming a dtype (by kind, size and byte order: ``np.longlong`` and
    ``np.int64`` are the same), equal on every rank of a homogeneous machine."""
    return zlib.crc32(np.dtype(dtype).str.encode()) & 0x7FFFFFFF


def lookup(op, dtype):
    """The numpy ufunc that performs ``op`` on ``dtype``.

    Returns None when the op is not one of MPI's predefined arithmetic, logical or bitwise
    reductions, or the dtype is not a simple numeric one: the caller then uses the MPI library.

    Raises
    ------
    TypeError
        ``op`` is predefined but MPI does not define it on the type class of ``dtype``
        (MIN on complex, BAND on float, SUM on bool, ...); the message names both.
    """
    name = op_name(op)
    if name is None or not simple_dtype(dtype):
        return None
    _, ufunc, classes = _TABLE[name]
    cls = type_class(dtype)
    if cls not in classes:
        raise TypeError(f"MPI.{name} is not defined for dtype {np.dtype(dtype).name} "
                        f"({cls} type); MPI defines {name} on {', '.join(classes)} types")
    return ufunc
