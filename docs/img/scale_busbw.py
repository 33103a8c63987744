"""Draw docs/img/scale_busbw.png: the simulator's predicted busbw of multitree, ring, ring2d
and rhd against rank count, from bench/scale_busbw.py's file.

    python docs/img/scale_busbw.py [bench/results/2026-12-08-scale-busbw.json] [OUT.png]

Needs matplotlib (the ``plot`` extra).
"""

import json
import sys
from pathlib import Path

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

HERE = Path(__file__).resolve().parent
DATA = HERE.parent.parent / "bench" / "results" / "2026-12-08-scale-busbw.json"
STYLE = {"multitree": ("C0", "o"), "ring": ("C1", "s"), "ring2d": ("C2", "^"),
         "rhd": ("C3", "v")}


def series(runs):
    # (algorithm, bytes) -> [(nodes, busbw)], in rank order
    out = {}
    for run in runs:
        for r in run.get("records", []):
            out.setdefault((r["algorithm"], r["bytes"]), []).append((r["nodes"], r["busbw_GBps"]))
    return out


def draw(data, out):
    lines = series(data["runs"])
    sizes = sorted({b for _, b in lines})
    fig = Figure(figsize=(4.2 * len(sizes), 3.4))
    FigureCanvasAgg(fig)
    for k, nbytes in enumerate(sizes):
        ax = fig.add_subplot(1, len(sizes), k + 1)
        for alg, (color, marker) in STYLE.items():
            pts = lines.get((alg, nbytes))
            if pts:
                ax.plot(*zip(*pts), color=color, marker=marker, label=alg)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("ranks (torus SxS)")
        ax.set_ylabel("predicted busbw (GB/s)")
        ax.set_title(f"{nbytes >> 20} MiB allreduce, 16 GB/s links")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=110)


if __name__ == "__main__":
    src = Path(sys.argv[1]) if len(sys.argv) > 1 else DATA
    dst = Path(sys.argv[2]) if len(sys.argv) > 2 else HERE / "scale_busbw.png"
    draw(json.loads(src.read_text()), dst)
