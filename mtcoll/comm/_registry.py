"""The mtcoll communicators of an MPI communicator, kept as an MPI attribute of it.

Every :class:`mtcoll.Comm` is registered on the MPI communicator it stands for, in one dict
per communicator stored under one keyval: the key is the construction options (with the
environment variables read at construction), or :data:`OWN` for the Comm a derivation made
(``Dup``, ``Split``, ``Create_cart``...: the communicator *is* that Comm). So:

* ``mtcoll.Comm(c, **options)`` of a communicator that already has a Comm with those options
  is a lookup (:func:`find`): no collective and no new MPI communicator. Every rank finds
  the same thing, because the dict changes only at collective points -- a construction, a
  ``Free()``, the communicator's own free;
* each Comm is released (its private duplicates and virtual topology freed, :func:`_release`)
  when the communicator is freed: MPI calls the keyval's delete callback inside
  ``MPI_Comm_free``, which every rank makes at the same point of its program, so the
  duplicates are freed collectively too. Dropping the last Python reference to a Comm frees
  nothing (the dict holds it): garbage collection runs at different moments on different
  ranks, and freeing a communicator is collective.

Who calls: :mod:`mtcoll.comm` (construction: :func:`find`, :func:`register`;
``Free``: :func:`forget`) and MPI (the delete callback).
"""

from __future__ import annotations

import os

from mpi4py import MPI

from .._env import STORE

#: The key of the Comm a derivation made of its own new communicator.
OWN = "own"

#: The construction options of ``mtcoll.Comm(c)`` with no arguments.
DEFAULT_OPTIONS = ("auto", "auto", None, None, None, None, False)

# environment variables read at construction: a Comm made under other values is another Comm
_ENV_NAMES = ("MTCOLL_ALGO", "MTCOLL_TOPOLOGY", "MTCOLL_TUNING", "MTCOLL_WAIT",
              "MTCOLL_PROGRESS", "MTCOLL_CALIBRATE", "MTCOLL_CACHE_DIR", "MTCOLL_PROBE_SECONDS",
              "MTCOLL_MEASURE_LINKS")
_ENV_KEYS = tuple(n.encode() for n in _ENV_NAMES)

_KEYVAL = None
_get_attr = MPI.Comm.Get_attr


def _keyval():
    global _KEYVAL
    if _KEYVAL is None:
        _KEYVAL = MPI.Comm.Create_keyval(delete_fn=_release)
    return _KEYVAL


def _release(comm, keyval, comms):
    # MPI frees ``comm`` (every rank, at the same point): release each of its Comms now. An
    # error is raised after the others are released (mpi4py makes it the free's MPI error).
    first = None
    for c in list(comms.values()):
        try:
            c._release()
        except BaseException as e:  # noqa: BLE001 (re-raised below)
            first = first or e
    comms.clear()
    if first is not None:
        raise first


def key(options):
    """The registry key of construction ``options`` (a tuple) under the current environment."""
    store = STORE
    env = tuple(map(store.get, _ENV_KEYS)) if store is not None \
        else tuple(os.environ.get(n) for n in _ENV_NAMES)
    return options, env


def find(comm, options):
    """``(comm's Comm for options, its key)``; ``(None, key)`` when it has none. With the
    default options, the Comm a derivation made of ``comm`` comes first. The key is None when
    an option cannot be one (``ports`` as an array, say: such a Comm is registered for release
    only, never found). One attribute lookup and two dict lookups: no MPI communication."""
    store = STORE  # (key(), inlined: this is every repeated construction's cost)
    k = (options, tuple(map(store.get, _ENV_KEYS)) if store is not None else key(options)[1])
    comms = _get_attr(comm, _KEYVAL) if _KEYVAL is not None else None
    try:
        if comms is None:
            hash(k)
            return None, k
        if options == DEFAULT_OPTIONS:
            own = comms.get(OWN)
            if own is not None:
                return own, k
        return comms.get(k), k
    except TypeError:
        return None, None


def register(comm, k, obj):
    """Register ``obj`` on ``comm`` under ``k`` (None, or a key already taken: under a key
    of its own, so that it is released with ``comm`` but never found)."""
    kv = _keyval()
    comms = MPI.Comm.Get_attr(comm, kv)
    if comms is None:
        comms = {}
        MPI.Comm.Set_attr(comm, kv, comms)
    if k is None or k in comms:
        k = object()
    comms[k] = obj


def forget(comm, obj):
    """Take ``obj`` out of ``comm``'s registry (its ``Free()``; ``comm`` still valid)."""
    comms = MPI.Comm.Get_attr(comm, _KEYVAL) if _KEYVAL is not None else None
    if comms:
        for k in [k for k, v in comms.items() if v is obj]:
            del comms[k]
