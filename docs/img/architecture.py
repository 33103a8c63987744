"""Draw docs/img/architecture.png, the data-flow diagram of docs/architecture.md.

    python docs/img/architecture.py [OUT.png]

Needs matplotlib (the ``plot`` extra). The boxes and labels are written out here by hand; when
a module is added or a boundary changes, edit the lists below and run the script again.
"""

import sys
from pathlib import Path

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.patches import FancyArrowPatch, FancyBboxPatch

# the pipeline: (x, label, module, what it owns)
PIPE = [
    (0.0, "topology", "mtcoll/topology.py",
     "spec string -> Topology:\nranks, links, routes,\nport budgets"),
    (2.6, "plan", "mtcoll/plan/",
     "pure function\n(topology, algorithm) -> Schedule;\nvalidator, numba kernels"),
    (5.2, "schedule", "mtcoll/schedule.py",
     "immutable numpy arrays:\n(phase, step, src, dst, lo, hi);\nRankSchedule per rank"),
    (7.8, "execute", "mtcoll/execute/",
     "Layout (pieces, dependencies)\n-> nonblocking sends/receives;\nno topology, no planner"),
    (10.4, "api", "mtcoll/comm/",
     "Comm: Allreduce, Iallreduce, ...\nrequests; auto + tuning table;\nrank 0 plans, scatters"),
]
# what crosses each boundary, left to right
CROSS = ["Topology", "Schedule", "RankSchedule", "Execution"]
# consumers: (x, label, module, uses)
USERS = [
    (1.3, "simulate", "mtcoll/simulate/", "plan + Topology"),
    (5.2, "plan CLI", "python -m mtcoll.plan", "plan, validate, --draw"),
    (8.5, "bench", "mtcoll/bench/", "Comm, every algorithm"),
    (11.1, "train", "mtcoll/train/", "Comm.Iallreduce"),
]
W, H = 2.2, 1.35


def box(ax, x, y, w, h, title, sub, body, fc):
    ax.add_patch(FancyBboxPatch((x - w / 2, y - h / 2), w, h, boxstyle="round,pad=0.04",
                                fc=fc, ec="0.3", lw=1))
    ax.text(x, y + h / 2 - 0.17, title, ha="center", va="center", fontsize=10,
            fontweight="bold")
    ax.text(x, y + h / 2 - 0.38, sub, ha="center", va="center", fontsize=7, family="monospace",
            color="0.25")
    if body:
        ax.text(x, y - 0.2, body, ha="center", va="center", fontsize=7, linespacing=1.25)


def arrow(ax, a, b, label=None, dy=0.16, style="-|>", color="0.2", rad=0.0):
    ax.add_patch(FancyArrowPatch(a, b, arrowstyle=style, mutation_scale=12, color=color, lw=1.2,
                                 connectionstyle=f"arc3,rad={rad}", shrinkA=2, shrinkB=2))
    if label:
        ax.text((a[0] + b[0]) / 2, (a[1] + b[1]) / 2 + dy, label, ha="center", va="bottom",
                fontsize=7.5, style="italic", color="0.15")


def main(out):
    fig = Figure(figsize=(13.2, 5.4), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_axes([0, 0, 1, 1])
    ax.set_xlim(-1.3, 12.4)
    ax.set_ylim(-2.75, 2.95)
    ax.axis("off")
    y0 = 0.8
    for x, t, m, body in PIPE:
        box(ax, x, y0, W, H, t, m, body, "#e8f0fa")
    for (x, *_), (x2, *_), label in zip(PIPE, PIPE[1:], CROSS):
        arrow(ax, (x + W / 2 + 0.04, y0), (x2 - W / 2 - 0.04, y0), label, dy=0.05)
    ax.text(5.2, 2.75, "the data flow of one allreduce: each stage knows only what crosses "
            "its left edge", ha="center", fontsize=9.5)
    # at run time Comm drives the pipeline: it builds the Topology, asks plan on rank 0,
    # scatters each rank its part of the Schedule and hands it to an Executor (cached per algorithm)
    arrow(ax, (10.4 - 0.2, y0 + H / 2 + 0.03), (0.2, y0 + H / 2 + 0.03), None,
          color="#3465a4", rad=0.1)
    ax.text(5.2, 2.18, "at run time Comm drives it: Topology from the communicator, plan on "
            "rank 0, scatter each rank its part, build an Executor; each cached per algorithm",
            ha="center", fontsize=7.5, color="#3465a4",
            bbox=dict(fc="white", ec="none", pad=1))
    yu = -1.95
    for x, t, m, uses in USERS:
        box(ax, x, yu, 2.0, 0.95, t, m, None, "#f3f3f3")
        ax.text(x, yu - 0.28, uses, ha="center", va="center", fontsize=7)
    # who each consumer calls
    arrow(ax, (1.3 - 0.6, yu + 0.48), (0.0 + 0.4, y0 - H / 2), color="0.55")
    arrow(ax, (1.3 + 0.6, yu + 0.48), (2.6 - 0.3, y0 - H / 2), color="0.55")
    arrow(ax, (5.2 - 0.5, yu + 0.48), (2.6 + 0.5, y0 - H / 2), color="0.55")
    arrow(ax, (8.5 + 0.5, yu + 0.48), (10.4 - 0.6, y0 - H / 2), color="0.55")
    arrow(ax, (11.1, yu + 0.48), (10.4 + 0.5, y0 - H / 2), color="0.55")
    ax.text(-1.2, -2.65, "consumers (grey) use the public pieces; jobs/ scripts launch bench "
            "and train under srun/mpiexec", fontsize=7.5, color="0.35")
    fig.savefig(out, dpi=100)


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else Path(__file__).with_name("architecture.png"))
