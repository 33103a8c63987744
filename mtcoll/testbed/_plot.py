"""``--plot FILE.png``: the topology drawn with each directed link colored by the bytes it
carried, and each vertex by the bytes it forwarded (needs matplotlib, the ``plot`` extra)."""

from __future__ import annotations

import math

from .._cli import pyplot

__all__ = ["plot", "positions"]


def positions(topo):
    """x, y of every vertex: grids on their first two coordinates, ring and full on a circle,
    switched networks' ranks on a row with their switches above."""
    n, nv = topo.nranks, topo.nvertices
    if topo.kind in ("torus", "mesh") and len(topo.dims) >= 2:
        rows = topo.dims[0]
        cols = n // rows
        return [(r % cols, rows - 1 - r // cols) for r in range(n)]
    if topo.kind in ("ring", "full") or nv == n:
        return [(math.cos(2 * math.pi * r / n), math.sin(2 * math.pi * r / n))
                for r in range(n)]
    # switched: ranks at the bottom; switches linked to ranks above them, the others on top
    src, dst = topo.link_src, topo.link_dst
    low = [v for v in range(n, nv) if any(s == v and d < n for s, d in zip(src, dst))]
    high = [v for v in range(n, nv) if v not in low]
    pos = {r: (float(r), 0.0) for r in range(n)}
    for y, members in ((1.5, low), (3.0, high)):
        for i, v in enumerate(members):
            pos[v] = ((i + 0.5) * n / len(members) - 0.5, y)
    return [pos[v] for v in range(nv)]


def plot(path, topo, traffic, title=""):
    """Write the drawing of ``traffic`` (as :meth:`Testbed.traffic` returns it) to ``path``."""
    plt = pyplot("--plot")
    from matplotlib import cm, colors

    pos = positions(topo)
    links = traffic["links"]
    top = max([x["bytes"] for x in links] + [1])
    norm = colors.Normalize(vmin=0, vmax=top / 1e6)
    cmap = cm.get_cmap("viridis") if hasattr(cm, "get_cmap") else plt.get_cmap("viridis")
    fig, ax = plt.subplots(figsize=(7, 6))
    wrap = topo.kind == "torus"
    for x in links:
        a, b = x["from"], x["to"]
        (xa, ya), (xb, yb) = pos[a], pos[b]
        dx, dy = xb - xa, yb - ya
        if wrap and (abs(dx) > 1.5 or abs(dy) > 1.5):
            # a wrap-around link: a stub leaving the grid from a, pointing away from b
            dx, dy = -math.copysign(0.45, dx) if abs(dx) > 1.5 else 0, \
                -math.copysign(0.45, dy) if abs(dy) > 1.5 else 0
            xb, yb = xa + dx, ya + dy
        length = math.hypot(dx, dy) or 1.0
        ox, oy = -dy / length * 0.06, dx / length * 0.06  # the two directions side by side
        ax.annotate("", xy=(xb + ox, yb + oy), xytext=(xa + ox, ya + oy),
                    arrowprops=dict(arrowstyle="-|>", color=cmap(norm(x["bytes"] / 1e6)),
                                    lw=2.5, shrinkA=9, shrinkB=9))
    fwd = traffic["forwarded"]
    for v, (x, y) in enumerate(pos):
        f = fwd.get(str(v))
        ax.scatter([x], [y], s=420, c="white" if not f else "salmon", edgecolors="black",
                   zorder=3)
        ax.text(x, y, str(v), ha="center", va="center", fontsize=8, zorder=4)
        if f:
            ax.text(x, y - 0.22, f"{f / 1e6:.1f} MB", ha="center", va="top", fontsize=6,
                    color="darkred", zorder=4)
    sm = cm.ScalarMappable(norm=norm, cmap=cmap)
    fig.colorbar(sm, ax=ax, label="MB carried per directed link")
    ax.set_title((title + "\n" if title else "") +
                 "red vertices forwarded packets (MB below); stubs at the edges are "
                 "wrap-around links", fontsize=9)
    xs, ys = [p[0] for p in pos], [p[1] for p in pos]
    ax.set_xlim(min(xs) - 0.7, max(xs) + 0.7)  # room for the wrap-around stubs
    ax.set_ylim(min(ys) - 0.7, max(ys) + 0.7)
    ax.set_axis_off()
    ax.set_aspect("equal")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
