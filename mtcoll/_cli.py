"""What every ``python -m mtcoll.<tool>`` shares: the ``--json [FILE]`` convention, progress
lines on stderr (:func:`say`), a quiet exit on a closed pipe (:func:`entry`), and matplotlib as
an optional extra (:func:`pyplot`).

``--json`` with no FILE, or ``-``, prints one JSON object on stdout *instead of* the table;
``--json FILE`` writes the object to FILE and still prints the table.
"""

from __future__ import annotations

import json
import os
import sys


def add_json_option(parser):
    parser.add_argument("--json", nargs="?", const="-", default=None, metavar="FILE",
                        help="write one JSON object to FILE (no FILE or '-': to stdout, "
                             "instead of the table)")


def add_topology_options(parser, default, many=False):
    """``--topology SPEC`` and ``--ranks N``, for the tools that need no MPI (plan, simulate)."""
    parser.add_argument("--topology", default=default,
                        help="topology spec, e.g. torus:8x8, mesh:4x4, fattree:8x8, or auto "
                             "with --ranks" + (" (a comma list: one table each)" if many else "")
                             + " (default: %(default)s)")
    parser.add_argument("--ranks", type=int, default=None, metavar="N",
                        help="the number of ranks: what 'auto' stands for with N ranks (the "
                             "topology an N-rank job gets); with any other spec, checked "
                             "against its size")


def resolve_topology(text, ranks):
    """The spec string(s) of ``--topology`` with ``auto`` resolved for ``--ranks`` (a comma
    list stays a comma list); ValueError naming the option for a bad value."""
    from .topology import parse

    specs = [s.strip() for s in text.split(",") if s.strip()]
    if not specs:
        raise ValueError("--topology: no spec given")
    if ranks is not None and ranks < 1:
        raise ValueError(f"--ranks must be a positive integer, got {ranks}")
    if ranks is None and any(s.lower() == "auto" for s in specs):
        raise ValueError("--topology auto needs --ranks N: auto is the topology mtcoll "
                         "picks for an N-rank job")
    out = []
    for s in specs:
        topo = parse(s, nranks=ranks if s.lower() == "auto" else None)
        if ranks is not None and topo.nranks != ranks:
            raise ValueError(f"--topology {s} has {topo.nranks} ranks, not the {ranks} of "
                             f"--ranks")
        out.append(topo.spec)
    return ",".join(out)


def say(text):
    """One whole line on stderr: progress, notes, errors.

    Under ``mpiexec`` stdout and stderr reach the terminal through separate pipes, and with
    ``2>&1`` a line written in two pieces (``print`` writes its newline apart) can be cut by the
    other stream's output. One write of the whole line, flushed at once, cannot be cut.
    """
    sys.stderr.write(text + "\n")
    sys.stderr.flush()


def line(text):
    """One whole line on stdout (a table row printed as it is measured), stderr flushed first:
    the stdout twin of :func:`say`."""
    sys.stderr.flush()
    sys.stdout.write(text + "\n")
    sys.stdout.flush()


def report(obj, json_dest, table, tool):
    """Print ``table()`` and/or write ``obj`` as JSON, as ``--json`` asked; a JSON file written
    is named on stderr (``tool: JSON written to FILE``).

    stderr is flushed first, so that no progress line can land inside the table."""
    sys.stderr.flush()
    if json_dest is not None:
        text = json.dumps(obj, indent=2)
        if json_dest == "-":
            print(text)
            sys.stdout.flush()
            return
        try:
            with open(json_dest, "w") as f:
                f.write(text + "\n")
        except OSError as e:
            raise ValueError(f"--json: cannot write {json_dest}: {e.strerror or e}") from None
        say(f"{tool}: JSON written to {json_dest}")
    table()
    sys.stdout.flush()


def entry(main):
    """Run a tool's ``main()`` and exit with its code, as a Unix tool does on a closed pipe.

    ``python -m mtcoll.simulate ... | head -n 2`` closes stdout early: the tool then exits with
    status 1 without a traceback, and stdout is pointed at ``/dev/null`` so that the interpreter's
    own flush at exit cannot raise again.
    """
    try:
        code = main()
        sys.stdout.flush()
    except BrokenPipeError:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        code = 1
    sys.exit(code)


def pyplot(what):
    """``matplotlib.pyplot`` on the non-interactive Agg backend; RuntimeError naming ``what``
    (the option or output that wanted it) and the ``plot`` extra when matplotlib is missing."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise RuntimeError(f"{what} needs matplotlib: pip install 'mtcoll[plot]'") from None
    return plt
