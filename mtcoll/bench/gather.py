"""``python -m mtcoll.bench.gather OUT_PREFIX FILE.json...``: a scaling table and plot from
several benchmark runs (the gather step of ``jobs/sweep.sh``).

Each FILE is the ``--json`` output of ``python -m mtcoll.bench`` (``{"meta", "results"}``), one
per run, typically one per rank count. The table has one row per (ranks, topology, size) and
one column per algorithm: busbw in GB/s and, in parentheses, the speed-up over the MPI
library's ``Allreduce`` of the same run (``vs native``, time ratio; ``-`` where the run had no
``native``). A result whose ``#wrong`` is not 0 is marked ``!``. The table is printed and
written to ``OUT_PREFIX.md``; the plot (``OUT_PREFIX.png``, needs ``mtcoll[plot]``) has one panel
per size with busbw against the rank count, one line per algorithm.

Exit status: 0; 1 if any result was wrong, a FILE is missing (the table is still made from
the others) or the plot could not be made (no matplotlib); 2 on bad input (no readable FILE, a
FILE that is not benchmark JSON, two FILEs with the same ranks, topology and size, an
OUT_PREFIX.md that cannot be written).

This is plain Python on one process: it does not use MPI (importing :mod:`mtcoll` initialises
MPI as a singleton, which needs no launcher).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .._cli import entry, say

__all__ = ["load", "rows", "format_markdown", "plot_scaling", "main"]


class GatherError(ValueError):
    """A FILE that cannot be used; the message names it."""


def load(path):
    """The ``(meta, results)`` of one benchmark JSON file; :class:`GatherError` if it is not."""
    try:
        with open(path) as f:
            obj = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise GatherError(f"{path}: not JSON ({e})") from None
    if not isinstance(obj, dict) or not isinstance(obj.get("meta"), dict) \
            or not isinstance(obj.get("results"), list):
        raise GatherError(f"{path}: not mtcoll.bench JSON (no 'meta' and 'results')")
    meta = obj["meta"]
    if "nranks" not in meta:
        raise GatherError(f"{path}: meta has no 'nranks'")
    for i, r in enumerate(obj["results"]):
        if not isinstance(r, dict):
            raise GatherError(f"{path}: results[{i}] is not an object")
        missing = [k for k in ("algorithm", "bytes", "busbw_GBps", "wrong") if k not in r]
        if missing:
            raise GatherError(f"{path}: results[{i}] has no {', '.join(missing)}")
    return meta, obj["results"]


def rows(runs):
    """Merge runs into table rows.

    Parameters
    ----------
    runs : list of (str, dict, list)
        ``(name, meta, results)`` per file, as :func:`load` returns plus the file name.

    Returns
    -------
    algorithms : list of str
        Every algorithm seen, in first-seen order (``native`` last).
    table : list of dict
        One per (ranks, topology, size), sorted by ranks, topology, size: ``{"ranks",
        "topology", "bytes", "cells": {algorithm: record}, "file"}``.
    """
    by_key = {}
    algorithms = []
    for name, meta, results in runs:
        topo = meta.get("topology", "?")
        for r in results:
            key = (int(meta["nranks"]), topo, int(r["bytes"]))
            row = by_key.setdefault(key, {"ranks": key[0], "topology": topo,
                                          "bytes": key[2], "cells": {}, "file": name})
            if row["file"] != name:
                raise GatherError(f"{row['file']} and {name} both have {key[0]} ranks on "
                                  f"{topo} at {key[2]} B: give one file per run")
            row["cells"][r["algorithm"]] = r
            if r["algorithm"] not in algorithms:
                algorithms.append(r["algorithm"])
    if "native" in algorithms:
        algorithms.remove("native")
        algorithms.append("native")
    return algorithms, [by_key[k] for k in sorted(by_key)]


def _cell(r):
    if r is None:
        return "-"
    sp = r.get("speedup_vs_native")
    text = f"{r['busbw_GBps']:.4g}" + (f" ({sp:.2f}x)" if sp is not None else " (-)")
    return text + (" !" if r["wrong"] else "")


def format_markdown(algorithms, table, notes=()):
    """The table as markdown: a header, one line per row, ``notes`` as a list below."""
    from . import format_size

    head = ["ranks", "topology", "size"] + algorithms
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in table:
        cells = [str(row["ranks"]), row["topology"], format_size(row["bytes"])]
        cells += [_cell(row["cells"].get(a)) for a in algorithms]
        lines.append("| " + " | ".join(cells) + " |")
    wrong = sum(1 for row in table for r in row["cells"].values() if r["wrong"])
    lines.append("")
    lines.append("busbw in GB/s (speed-up over the MPI library's Allreduce in the same run); "
                 f"{wrong} result(s) with #wrong > 0, marked !")
    lines += [f"- {n}" for n in notes]
    return "\n".join(lines) + "\n"


def plot_scaling(path, algorithms, table):
    """busbw against ranks, one panel per size, one line per algorithm (needs matplotlib)."""
    from .._cli import pyplot
    plt = pyplot("the plot")
    from . import format_size

    sizes = sorted({row["bytes"] for row in table})
    ranks = sorted({row["ranks"] for row in table})
    ncols = min(3, len(sizes))
    nrows = -(-len(sizes) // ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(4.5 * ncols, 3.5 * nrows), squeeze=False)
    for ax, size in zip(axes.flat, sizes):
        for a in algorithms:
            pts = sorted((row["ranks"], row["cells"][a]["busbw_GBps"]) for row in table
                         if row["bytes"] == size and a in row["cells"])
            if pts:
                ax.plot(*zip(*pts), marker="o", markersize=3, label=a,
                        linestyle="--" if a == "native" else "-")
        ax.set_xscale("log", base=2)
        ax.set_xticks(ranks, [str(n) for n in ranks])
        ax.minorticks_off()
        ax.set_ylim(bottom=0)
        ax.set_title(f"{format_size(size)}")
        ax.set_xlabel("ranks")
        ax.set_ylabel("busbw (GB/s)")
        ax.grid(True, which="both", alpha=0.3)
    for ax in list(axes.flat)[len(sizes):]:
        ax.set_visible(False)
    axes.flat[0].legend(fontsize="small")
    fig.suptitle("allreduce scaling")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None):
    p = argparse.ArgumentParser(
        prog="python -m mtcoll.bench.gather",
        description="Gather mtcoll.bench JSON files (one per run) into a table of busbw per "
                    "ranks, size and algorithm (OUT_PREFIX.md, also printed) and a plot of "
                    "busbw against ranks (OUT_PREFIX.png).")
    p.add_argument("out_prefix", metavar="OUT_PREFIX",
                   help="write OUT_PREFIX.md and OUT_PREFIX.png")
    p.add_argument("files", metavar="FILE.json", nargs="+",
                   help="--json outputs of python -m mtcoll.bench, one per run")
    p.add_argument("--no-plot", action="store_true", help="write the table only")
    args = p.parse_args(argv)

    runs, notes, status = [], [], 0
    try:
        for name in args.files:
            if not Path(name).exists():
                notes.append(f"{name}: missing (its run failed or has not finished)")
                status = 1
                continue
            runs.append((name, *load(name)))
        if not runs:
            raise GatherError("no FILE could be read: " + "; ".join(notes))
        algorithms, table = rows(runs)
    except (GatherError, OSError) as e:
        say(f"mtcoll.bench.gather: error: {e}")
        return 2
    if any(r["wrong"] for row in table for r in row["cells"].values()):
        status = 1
    text = format_markdown(algorithms, table, notes)
    try:
        Path(args.out_prefix + ".md").write_text(text)
    except OSError as e:
        say(f"mtcoll.bench.gather: error: OUT_PREFIX: cannot write {args.out_prefix}.md: "
            f"{e.strerror or e}")
        return 2
    sys.stdout.write(text)
    sys.stdout.flush()
    if not args.no_plot:
        try:
            plot_scaling(args.out_prefix + ".png", algorithms, table)
        except RuntimeError as e:  # no matplotlib: the table stands, the plot is missing
            notes.append(f"{args.out_prefix}.png not written: {e}")
            args.no_plot, status = True, 1
    for n in notes:
        say(f"mtcoll.bench.gather: {n}")
    say(f"mtcoll.bench.gather: {len(runs)} run(s), {len(table)} rows written to "
        f"{args.out_prefix}.md" + ("" if args.no_plot else f" and {args.out_prefix}.png"))
    return status


if __name__ == "__main__":
    entry(main)
