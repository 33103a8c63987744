"""The zero-line mode: an unmodified mpi4py program, with ``MPI.COMM_WORLD`` an mtcoll ``Comm``.

    python -m mtcoll.run script.py [arg ...]
    python -m mtcoll.run -m module [arg ...]
    python -m mtcoll.run -c command [arg ...]
    mpiexec -n N python -m mpi4py -m mtcoll.run script.py [arg ...]

Before the program starts, every rank builds ``mtcoll.Comm(MPI.COMM_WORLD)`` (collective, as
any construction; its options come from the environment: ``MTCOLL_ALGO``,
``MTCOLL_TOPOLOGY``...) and puts it in the place of ``mpi4py.MPI.COMM_WORLD`` (:func:`switch`).
The program's ``from mpi4py import MPI`` then finds it there, and what the program derives
from it (``Dup``, ``Split``, ``Create_cart``...) is an mtcoll communicator too: its
``Allreduce``, ``Iallreduce``, ``Reduce_scatter_block`` and ``Allgather`` are mtcoll's, every
other method mpi4py's own.

The program then runs as ``python script.py`` runs it: ``sys.argv`` is the script and its
arguments, its code runs as ``__main__`` with the script's directory first on ``sys.path``
(``-m``: as ``python -m module``; ``-c``: as ``python -c``), its exit status is its own, and an
uncaught exception prints its traceback (through ``sys.excepthook``, without this module's
frames) and exits with status 1 -- which ``python -m mpi4py`` turns into ``MPI_Abort`` of the
whole job, as it does for the program run directly.

What it cannot reach (docs/sharp-bits.md): a communicator the program builds from a handle
itself (``MPI.Intracomm(comm)``, ``pkl5.Intracomm(comm)``), a ``COMM_WORLD`` some module took
before the switch (named with ``MTCOLL_DEBUG=1``), mpi4py's lowercase (pickle) calls and the
collectives mtcoll does not define. With ``MTCOLL_DEBUG=1`` rank 0 says what was switched, and
at the end how many of the program's calls mtcoll served on rank 0 (and, when none, why that
may be).
"""

from __future__ import annotations

import builtins
import os
import runpy
import sys
import types

USAGE = """\
usage: python -m mtcoll.run script.py [arg ...]
   or: python -m mtcoll.run -m module [arg ...]
   or: python -m mtcoll.run -c command [arg ...]

Runs an mpi4py program with MPI.COMM_WORLD an mtcoll.Comm (and the communicators derived
from it mtcoll's): mtcoll serves its Allreduce, Iallreduce, Reduce_scatter_block and
Allgather calls. Under mpiexec run it as `python -m mpi4py -m mtcoll.run ...`, so that an
uncaught exception on one rank aborts the job. MTCOLL_* variables set the Comm's options
(MTCOLL_ALGO, MTCOLL_TOPOLOGY...); MTCOLL_DEBUG=1 shows what mtcoll ran (docs/api.md)."""

_HERE = os.path.abspath(__file__)
_RUNPY = os.path.abspath(runpy.__file__)


def switch():
    """Put an :class:`mtcoll.Comm` of ``MPI.COMM_WORLD`` in the place of
    ``mpi4py.MPI.COMM_WORLD`` and return it (collective: every rank must call it). Calling it
    again returns the Comm already there. Code that took ``MPI.COMM_WORLD`` before (``comm =
    MPI.COMM_WORLD`` at a module's top level, run before the switch) keeps mpi4py's own."""
    from mpi4py import MPI

    from .comm import Comm

    world = MPI.COMM_WORLD
    if isinstance(world, Comm):
        return world
    comm = Comm(world)
    MPI.COMM_WORLD = comm
    if _debug() and comm.Get_rank() == 0:
        _say(f"MPI.COMM_WORLD is {comm!r} for the program (python -m mtcoll.run): its calls and "
             f"those of the communicators derived from it are mtcoll's; a communicator the "
             f"program builds from a handle itself (MPI.Intracomm(comm)...) is mpi4py's")
        for where in _holders(world):
            _say(f"{where} holds MPI.COMM_WORLD as it was before the switch: calls through it "
                 f"are mpi4py's, not mtcoll's")
    return comm


def main(argv=None):
    """``python -m mtcoll.run``: parse ``argv`` (default ``sys.argv[1:]``), switch, run."""
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help"):
        print(USAGE, file=sys.stdout if args else sys.stderr)
        sys.exit(0 if args else 2)
    kind, target, rest = _parse(args)
    if kind == "path":
        _check_readable(target)
    rank = switch().Get_rank()  # (the program may finalize MPI before it ends)
    from .comm import _dispatch

    before = _dispatch.shown
    try:
        _run(kind, target, rest)
    except (SystemExit, KeyboardInterrupt):
        _summary(rank, before)
        raise
    except BaseException as e:  # noqa: BLE001 -- as the interpreter reports it, then exit 1
        tb = _program_frames(e.__traceback__)
        sys.excepthook(type(e), e.with_traceback(tb), tb)
        sys.exit(1)
    _summary(rank, before)


def _parse(args):
    first = args[0]
    if first in ("-m", "-c"):
        if len(args) < 2:
            _usage_error(f"argument expected for option {first}")
        return ("module" if first == "-m" else "command"), args[1], args[2:]
    if first.startswith("-"):
        _usage_error(f"unknown option {first!r}")
    return "path", first, args[1:]


def _usage_error(message):
    print(f"python -m mtcoll.run: {message}\n{USAGE.splitlines()[0]}\n"
          f"Try `python -m mtcoll.run --help` for more.", file=sys.stderr)
    sys.exit(2)


def _check_readable(path):
    # as the interpreter says it, before any collective (every rank finds the same); a
    # directory is runpy's to judge (it runs one with a __main__.py)
    if os.path.isdir(path):
        return
    try:
        with open(path, "rb"):
            pass
    except OSError as e:
        print(f"python -m mtcoll.run: can't open file {os.path.abspath(path)!r}: "
              f"[Errno {e.errno}] {e.strerror}", file=sys.stderr)
        sys.exit(2)


def _run(kind, target, rest):
    if kind == "path":
        sys.argv[:] = [target, *rest]
        if not sys.flags.isolated:  # python script.py puts the script's directory first
            sys.path[0] = os.path.dirname(os.path.realpath(target))
        path = os.path.abspath(target)
        if not os.path.isfile(path):  # a directory or zip file with a __main__.py
            runpy.run_path(target, run_name="__main__")
            return
        with open(path, "rb") as f:
            source = f.read()
        # as python script.py: __file__ absolute, sys.argv[0] as given
        _run_in_main(compile(source, path, "exec", dont_inherit=True), __file__=path)
    elif kind == "module":
        sys.argv[:] = [target, *rest]  # (runpy puts the module's file in sys.argv[0])
        runpy.run_module(target, run_name="__main__", alter_sys=True)
    else:
        sys.argv[:] = ["-c", *rest]
        if not sys.flags.isolated:
            sys.path[0] = ""
        _run_in_main(compile(target, "<string>", "exec", dont_inherit=True))


def _run_in_main(code, **names):
    # the program's code in a new __main__ module, as the interpreter runs a script or -c
    # (dont_inherit above: this module's __future__ imports are not the program's)
    main = types.ModuleType("__main__")
    main.__builtins__ = builtins
    main.__dict__.update(names)
    saved = sys.modules.get("__main__")
    sys.modules["__main__"] = main
    try:
        exec(code, main.__dict__)  # noqa: S102 -- what python script.py does
    finally:
        sys.modules["__main__"] = saved


def _program_frames(tb):
    # the traceback from the program's first frame on, as python script.py shows it
    while tb is not None and _ours(tb.tb_frame.f_code.co_filename):
        tb = tb.tb_next
    return tb


def _ours(filename):
    return filename == "<frozen runpy>" or os.path.abspath(filename) in (_HERE, _RUNPY)


def _holders(plain):
    # module globals that hold the world communicator as mpi4py made it (taken before the
    # switch); mpi4py.MPI itself is where the switch put mtcoll's, and mtcoll's own modules
    # keep the plain one on purpose (a Comm stands for it)
    found = []
    for name, module in list(sys.modules.items()):
        if name in ("mpi4py.MPI", "mtcoll") or name.startswith("mtcoll.") or module is None:
            continue
        try:
            items = list(vars(module).items())
        except TypeError:
            continue
        found += [f"{name}.{attr}" for attr, value in items if value is plain]
    return found


def _summary(rank, before):
    if rank != 0 or not _debug():
        return
    from .comm import _dispatch

    n = _dispatch.shown - before
    if n:
        _say(f"mtcoll served {n} of the program's calls on rank 0")
    else:
        _say("no call of the program reached mtcoll on rank 0: its collectives may be ones "
             "mtcoll does not define (Bcast, Reduce, the lowercase allreduce...), or run on a "
             "communicator mtcoll does not know (MPI.Intracomm(comm), pkl5, MPI.COMM_WORLD "
             "taken before the switch; see docs/sharp-bits.md)")


def _debug():
    from ._env import env_flag

    return env_flag("MTCOLL_DEBUG")


def _say(line):
    print(f"mtcoll[rank 0]: run: {line}", file=sys.stderr, flush=True)


if __name__ == "__main__":
    main()
