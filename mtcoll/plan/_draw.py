"""Pictures of a schedule: ``python -m mtcoll.plan --topology torus:4x4 --draw trees.png``.

Two kinds of figure, both small multiples on the topology's own layout:

* **steps** (the default): one panel per step of one phase. Every transfer of that step is an
  arrow from sender to receiver, colored by the tree it belongs to: the owner of the chunk it
  carries (``Schedule.owner``; for MultiTree, tree ``r`` is rooted at rank ``r`` and carries
  chunk ``r``). Each rank is filled with the color of the tree rooted at it, so an arrow's
  color says where its chunk is going (reduce) or coming from (gather).
* **trees** (``trees=[r, ...]``): one panel per tree, every transfer of that tree in the phase
  at once, each labelled with its step. With ``steps`` as well, a row of panels per tree, one
  per step: the tree as it grows, that step's transfers in bold over the earlier ones.

Layouts:

* torus and mesh: the ranks at their grid positions (2-D: rows and columns; 3-D: in oblique
  projection, each slice along the first axis drawn up and to the right of the one before). A
  wrap-around transfer is a short stub leaving the sender's edge of the grid and an arrow
  entering the receiver's opposite edge; a transfer between ranks that are not linked (it
  crosses several links) is bent, so that it does not run through the ranks in between.
* ring, full, and grids of four or more dimensions: a circle.
* ``hier``: hosts on a circle round the central switch, each host's ranks on a small circle.
* ``fattree`` and ``bigraph``: layers, the switches in grey and the ranks grouped under their
  switch. Transfers cross the switches but are drawn rank to rank, as arcs along a row.

Transfers that carry more than one chunk (rhd, ring2d) are drawn thicker and labelled with
their chunk range.

Topologies of more than :data:`MAX_RANKS` ranks are refused; a phase of more than
:data:`MAX_PANELS` steps draws its first :data:`MAX_PANELS` unless ``steps`` picks others.
matplotlib is needed (the ``plot`` extra); without it :func:`draw` raises RuntimeError.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from ..schedule import GATHER, REDUCE

__all__ = ["draw", "check_size", "Drawing", "MAX_RANKS", "MAX_PANELS"]

MAX_RANKS = 64  #: larger topologies are refused: the arrows would no longer be readable
MAX_PANELS = 16  #: steps drawn when ``steps`` is not given

_NODE_R = 0.2  # node radius in layout units (grid spacing 1)
_LANE = 0.085  # offset of the two directions of a link, so u->v and v->u do not overlap
_STUB = 0.42  # length of a wrap-around stub
_ARC_DEPTH = 3.0  # arcs along a row of ranks bow at most half this far
_PHASE_NAME = {REDUCE: "reduce-scatter", GATHER: "all-gather"}


@dataclass(frozen=True)
class Drawing:
    """What :func:`draw` drew.

    ``panels``: one ``(title, arrows)`` pair per panel, ``arrows`` being the number of transfer
    arrows counted on that panel's axes after drawing (a wrap-around transfer is one arrow plus
    one stub; the faint earlier transfers of a growing tree are not counted); ``steps``: the
    steps drawn, ``()`` for whole trees; ``trees``: the roots drawn, or ``()`` in steps mode;
    ``path``: the file written.
    """

    path: str
    phase: int
    steps: tuple
    trees: tuple
    panels: tuple

    @property
    def arrows(self):
        return sum(n for _, n in self.panels)


def load_matplotlib():
    try:
        import matplotlib
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
        from matplotlib import patches
    except ImportError:
        raise RuntimeError("--draw needs matplotlib, which comes with the 'plot' extra: "
                           "pip install 'mtcoll[plot]'") from None
    return matplotlib, Figure, FigureCanvasAgg, patches


# -- layouts ---------------------------------------------------------------------------------------

@dataclass
class _Layout:
    pos: np.ndarray  # (nranks, 2)
    links: list  # background rank-rank links as ((x, y), (x, y)) pairs, drawn grey
    switches: list  # (x, y) of switches, drawn as grey squares
    wrap: dict  # (u, v) -> unit vector of travel, for transfers drawn as stub + arrow
    arc: float  # curvature of arrows between ranks not next to each other (0: straight)
    bow: np.ndarray = None  # ranks in rows: +1 arcs along the row bow down, -1 up
    near: frozenset = None  # grids: linked rank pairs; other transfers are bent off the grid


def _circle(n, radius=None, center=(0.0, 0.0), start=math.pi / 2):
    radius = radius if radius is not None else max(1.5, 1.3 * n / (2 * math.pi))
    a = start - 2 * math.pi * np.arange(n) / max(n, 1)  # clockwise from the top
    return np.column_stack((center[0] + radius * np.cos(a), center[1] + radius * np.sin(a)))


def _grid_layout(topo):
    dims = topo.dims
    n = topo.nranks
    strides = [math.prod(dims[i + 1:]) for i in range(len(dims))]
    coords = np.array([[(r // s) % d for s, d in zip(strides, dims)] for r in range(n)])
    if len(dims) == 2:
        pos = np.column_stack((coords[:, 1], -coords[:, 0])).astype(float)
        axis_dir = [np.array([0.0, -1.0]), np.array([1.0, 0.0])]
    else:
        # 3-D, drawn in oblique projection: the slices along axis 0 are copies of one 2-D grid,
        # each shifted up and right of the one before, the grid spread out to make room
        a = dims[0]
        depth = np.array([0.5, 0.35])
        g = 1.0 + 0.5 * (a - 1)
        pos = (np.column_stack((coords[:, 2], -coords[:, 1])) * g
               + coords[:, :1] * depth).astype(float)
        axis_dir = [depth / np.hypot(*depth), np.array([0.0, -1.0]), np.array([1.0, 0.0])]
    links, wrap = [], {}
    periodic = topo.kind == "torus"
    for u in range(n):
        for v in topo.tree_neighbors(u):
            diff = coords[v] - coords[u]
            axis = int(np.flatnonzero(diff)[0])
            d = dims[axis]
            if periodic and d > 2 and abs(diff[axis]) == d - 1:
                # wrap-around: travel continues past the grid's edge in the + or - direction
                wrap[(u, v)] = axis_dir[axis] * (-np.sign(diff[axis]))
            elif u < v:
                links.append((pos[u], pos[v]))
    near = frozenset((u, v) for u in range(n) for v in topo.tree_neighbors(u))
    return _Layout(pos, links, [], wrap, 0.35, near=near)


def _layout(topo):
    kind, dims, n = topo.kind, topo.dims, topo.nranks
    if kind in ("torus", "mesh") and len(dims) in (2, 3):
        return _grid_layout(topo)
    if kind in ("ring", "full", "torus", "mesh"):  # grids here have 4 or more dimensions
        pos = _circle(n)
        links = [(pos[u], pos[v]) for u in range(n) for v in topo.tree_neighbors(u) if u < v]
        if kind == "full" and n > 12:
            links = []  # all pairs would grey the whole disc
        return _Layout(pos, links, [], {}, 0.0)
    if kind == "hier":
        nhost, r = dims
        centers = _circle(nhost, radius=max(2.4, nhost * (0.9 + 0.25 * r) / (2 * math.pi)))
        rh = 0.35 + 0.08 * r
        pos = np.concatenate([_circle(r, radius=rh, center=c) for c in centers])
        # each host's NIC between the host and the central switch
        nics = [c * (1 - (rh + 0.45) / np.hypot(*c)) for c in centers]
        links = [(pos[u], pos[v]) for u in range(n) for v in range(u - u % r, u - u % r + r)
                 if u < v]
        links += [(pos[u], nics[u // r]) for u in range(n)]
        links += [(c, (0.0, 0.0)) for c in nics]
        return _Layout(pos, links, [(0.0, 0.0)] + [tuple(c) for c in nics], {}, 0.0)
    if kind == "fattree":
        nleaf, m = dims
        x = np.array([r + 0.6 * (r // m) for r in range(n)], float)
        pos = np.column_stack((x, np.zeros(n)))
        leaves = [(x[l * m:(l + 1) * m].mean(), 1.6) for l in range(nleaf)]
        width = x.max() if n else 0.0
        spines = [(width * (s + 0.5) / m, 3.0) for s in range(m)]
        links = [(pos[r], leaves[r // m]) for r in range(n)]
        links += [(lf, sp) for lf in leaves for sp in spines]
        return _Layout(pos, links, leaves + spines, {}, 0.35, np.ones(n))
    if kind == "bigraph":
        m, nsw = dims
        half = nsw // 2
        # upper switches' ranks in a top row, lower switches' ranks in a bottom row
        pos = np.zeros((n, 2))
        for r in range(n):
            s, i = divmod(r, m)
            row = s if s < half else s - half
            pos[r] = (row * (m + 0.6) + i, 4.0 if s < half else 0.0)
        sw = [(pos[s * m:(s + 1) * m, 0].mean(), 2.8 if s < half else 1.2) for s in range(nsw)]
        links = [(pos[r], sw[r // m]) for r in range(n)]
        links += [(sw[a], sw[b]) for a in range(half) for b in range(half, nsw)]
        bow = np.where(pos[:, 1] > 2, -1.0, 1.0)  # away from the switches in the middle
        return _Layout(pos, links, sw, {}, 0.3, bow)
    # a kind this module does not know: a circle, links as given
    pos = _circle(n)
    links = [(pos[u], pos[v]) for u in range(n) for v in topo.tree_neighbors(u) if u < v]
    return _Layout(pos, links, [], {}, 0.0)


# -- colors ----------------------------------------------------------------------------------------

def _tree_colors(matplotlib, n):
    """One color per rank (tree root); neighbours in rank order get different hues."""
    cm = matplotlib.colormaps
    tab = cm["tab20"].colors
    out = [tab[i] for i in list(range(0, 20, 2)) + list(range(1, 20, 2))]  # dark hues first
    for name in ("tab20b", "tab20c"):  # 5 hues x 4 shades each: take one shade of each hue
        c = cm[name].colors
        out += [c[i] for k in range(4) for i in range(k, 20, 4)]
    if n > len(out):
        # golden-ratio stride round the hue circle keeps consecutive ranks apart
        out += [cm["hsv"]((i * 0.618034) % 1.0) for i in range(n - len(out))]
    return out[:n]


# -- drawing ---------------------------------------------------------------------------------------

def _parse_steps(steps, nsteps):
    if steps is None:
        return list(range(min(nsteps, MAX_PANELS)))
    out = []
    for t in steps:
        t = int(t)
        if not 0 <= t < nsteps:
            raise ValueError(f"steps: step {t} is not in this phase's steps 0..{nsteps - 1}")
        out.append(t)
    if not out:
        raise ValueError("steps: no step given")
    return sorted(set(out))


def check_size(topology):
    """The parsed topology, or ValueError if it has more than :data:`MAX_RANKS` ranks."""
    from ..topology import parse

    topo = parse(topology)
    if topo.nranks > MAX_RANKS:
        raise ValueError(f"--draw draws at most {MAX_RANKS} ranks (the arrows would not be "
                         f"readable); {topo.spec} has {topo.nranks}")
    return topo


def draw(schedule, topology, path, phase=GATHER, steps=None, trees=None, dpi=100):
    """Draw ``schedule`` on the layout of ``topology`` and write a PNG to ``path``.

    Parameters
    ----------
    schedule : Schedule
    topology : str or Topology
        What the schedule was planned on (its spec is enough).
    path : str or path-like
        The PNG file to write.
    phase : {GATHER, REDUCE} or {"gather", "reduce"}
        The phase drawn (default: gather, where tree ``r`` grows outward from rank ``r``).
    steps : iterable of int, optional
        Steps mode: the steps to draw, one panel each (default: the first :data:`MAX_PANELS`).
    trees : iterable of int, optional
        Trees mode instead: one panel per listed rank, showing every transfer of the phase that
        carries a chunk owned by that rank, labelled with its step. With ``steps`` too, one
        row of panels per tree and one panel per step: that step's transfers of the tree in
        bold, the earlier ones faint, and the ranks the tree has reached so far filled.
    dpi : int

    Returns
    -------
    Drawing
        The panels and the number of transfer arrows found on each after drawing.

    Raises
    ------
    ValueError
        More than :data:`MAX_RANKS` ranks, a topology that does not match the schedule, a bad
        phase, step or tree root.
    RuntimeError
        matplotlib is not installed (install the ``plot`` extra).
    """
    topo, phase, trees, step_list = _check_draw(schedule, topology, phase, steps, trees)
    matplotlib, Figure, FigureCanvasAgg, patches = load_matplotlib()
    n = schedule.nranks
    nsteps = schedule.steps[phase]

    lay = _layout(topo)
    colors = _tree_colors(matplotlib, n)
    owned = np.zeros(n, bool)
    owned[schedule.owner] = True

    sel = schedule.phase == phase
    rows = np.column_stack((schedule.step[sel], schedule.src[sel], schedule.dst[sel],
                            schedule.lo[sel], schedule.hi[sel]))
    panels = _panels(schedule, rows, trees, step_list)

    lo_xy, hi_xy = _extent(lay)
    pw, ph, ncol, nrow = _grid(hi_xy - lo_xy, len(panels), trees, step_list)
    head = 0.75
    fig = Figure(figsize=(ncol * pw + 0.2, nrow * ph + head), dpi=dpi)
    FigureCanvasAgg(fig)
    fig.suptitle(_caption(schedule, topo, phase, nsteps, int(sel.sum()), step_list, trees),
                 fontsize=9, y=1 - 0.08 / (nrow * ph + head))
    top = 1 - head / (nrow * ph + head)
    fig.subplots_adjust(left=0.01, right=0.99, bottom=0.01, top=top, wspace=0.04, hspace=0.12)

    counted = []
    for i, panel in enumerate(panels):
        ax = fig.add_subplot(nrow, ncol, i + 1)
        got = _draw_panel(ax, lay, patches, schedule, colors, owned, lo_xy, hi_xy, panel)
        counted.append((panel[0], got))
    fig.savefig(path, dpi=dpi)
    return Drawing(str(path), phase, tuple(step_list), tuple(trees or ()), tuple(counted))


def _check_draw(schedule, topology, phase, steps, trees):
    """draw's arguments checked against the schedule, before matplotlib is looked for:
    (topology, phase constant, tree roots or None, steps to draw)."""
    topo = check_size(topology)
    n = schedule.nranks
    if topo.nranks != n:
        raise ValueError(f"topology {topo.spec!r} has {topo.nranks} ranks but the schedule "
                         f"has {n}")
    phase = {"reduce": REDUCE, "gather": GATHER}.get(phase, phase)
    if phase not in (REDUCE, GATHER):
        raise ValueError(f"phase must be 'reduce' or 'gather', got {phase!r}")
    if trees is not None:
        trees = [int(r) for r in trees]
        bad = [r for r in trees if not 0 <= r < n]
        if bad or not trees:
            raise ValueError(f"tree: roots must be ranks in [0, {n}), got {trees}")
    nsteps = schedule.steps[phase]
    step_list = _parse_steps(steps, nsteps) if trees is None or steps is not None else []
    return topo, phase, trees, step_list


def _panels(schedule, rows, trees, step_list):
    """The panels to draw, never none (a lone layout says "no transfers")."""
    n = schedule.nranks
    # a panel: (title, transfers drawn bold, root or None, earlier transfers drawn faint,
    # ranks reached so far or None)
    if trees is None:
        panels = [(f"step {t}", rows[rows[:, 0] == t], None, None, None) for t in step_list]
    else:
        panels = []
        for r in trees:
            mine = np.flatnonzero(schedule.owner == r)
            keep = np.array([((mine >= lo) & (mine < hi)).any() for lo, hi in rows[:, 3:5]],
                            bool) if len(rows) else np.zeros(0, bool)
            tree = rows[keep]
            if not step_list:
                panels.append((f"tree rooted at rank {r}", tree, r, None, None))
            for t in step_list:
                reached = np.zeros(n, bool)
                reached[r] = True
                upto = tree[tree[:, 0] <= t]
                reached[upto[:, 1]] = reached[upto[:, 2]] = True
                panels.append((f"tree {r}, step {t}", tree[tree[:, 0] == t], r,
                               tree[tree[:, 0] < t], reached))

    if not panels:  # one rank, or a phase without transfers: the layout alone
        panels = [("no transfers", rows[:0], None, None, None)]
    return panels


def _extent(lay):
    """(lower-left, upper-right) corners every panel shows: the ranks, switches and arcs."""
    xy = np.vstack([lay.pos] + [np.array(lay.switches).reshape(-1, 2)])
    lo_xy, hi_xy = xy.min(axis=0) - 0.75, xy.max(axis=0) + 0.75
    if lay.bow is not None:  # room for the arcs along the rows
        depth = min(lay.arc * (lay.pos[:, 0].max() - lay.pos[:, 0].min()), _ARC_DEPTH) / 2
        lo_xy[1] -= depth * (lay.bow > 0).any()
        hi_xy[1] += depth * (lay.bow < 0).any()
    return lo_xy, hi_xy


def _grid(span, npanels, trees, step_list):
    """(panel width, panel height in inches, columns, rows) for panels showing ``span``."""
    # panels as square-ish as the layout, at most 4 a row
    scale = min(0.75, 7.0 / span[0], 4.5 / span[1])
    pw, ph = max(span[0] * scale, 2.0), max(span[1] * scale, 1.6) + 0.35
    ncol = min(npanels, 4 if pw < 4.5 else 2, max(2, math.ceil(math.sqrt(npanels))))
    if trees is not None and step_list and len(step_list) <= 6 and pw < 4.5:
        ncol = len(step_list)  # one row per tree
    nrow = math.ceil(npanels / ncol)
    return pw, ph, ncol, nrow


def _caption(schedule, topo, phase, nsteps, ntransfers, step_list, trees):
    """The figure's two title lines: what is drawn, and how to read it."""
    phase_name = _PHASE_NAME[phase]
    what = (f"{schedule.algorithm} on {topo.spec}, {phase_name} phase "
            f"({nsteps} steps, {ntransfers} transfers)")
    shown = ""
    if step_list:
        shown = (f"steps {step_list[0]}-{step_list[-1]}" if step_list == list(
            range(step_list[0], step_list[-1] + 1)) else "steps " + ",".join(map(str, step_list)))
    if trees is None:
        if len(step_list) < nsteps:
            what += f"; {shown} of 0-{nsteps - 1}"
        key = ("arrow color = the tree (chunk owner) it belongs to; each rank is filled with "
               "its own tree's color")
    elif not step_list:
        key = "each arrow labelled with its step; thick ring = the root"
    else:
        key = (f"{shown}: this step's transfers bold, earlier ones faint; filled = the ranks "
               "the tree has reached; thick ring = the root")
    return what + "\n" + key


def _draw_panel(ax, lay, patches, schedule, colors, owned, lo_xy, hi_xy, panel):
    """Draw one panel on ``ax``; the transfer arrows found on it afterwards (Drawing.panels)."""
    title, tr, root, earlier, reached = panel
    ax.set_aspect("equal")
    ax.set_xlim(lo_xy[0], hi_xy[0])
    ax.set_ylim(lo_xy[1], hi_xy[1])
    ax.axis("off")
    _background(ax, lay, patches)
    for t, s, d, clo, chi in (earlier if earlier is not None else ()):
        _transfer(ax, lay, patches, int(s), int(d), "0.55", 0.8, None, gid="earlier")
    for t, s, d, clo, chi in tr:
        c = colors[schedule.owner[clo]]
        label = None
        if root is not None and reached is None:
            label = str(t)
        elif chi - clo > 1:
            label = f"{clo}-{chi - 1}"
        _transfer(ax, lay, patches, int(s), int(d), c, 1.0 + 0.6 * min(chi - clo - 1, 3),
                  label)
    if reached is None:
        _nodes(ax, lay, patches, colors, owned, root)
    else:
        _nodes(ax, lay, patches, [colors[root]] * schedule.nranks, reached, root)
    ax.set_title(f"{title}: {len(tr)} transfers", fontsize=9, pad=2)
    return sum(1 for p in ax.patches if p.get_gid() == "transfer")


def _background(ax, lay, patches):
    for a, b in lay.links:
        ax.plot([a[0], b[0]], [a[1], b[1]], color="0.85", lw=0.8, zorder=0)
    for (u, v), vec in lay.wrap.items():
        if u < v or (v, u) not in lay.wrap:  # one grey stub pair per link
            for p, sign in ((lay.pos[u], 1), (lay.pos[v], -1)):
                q = p + sign * vec * (_STUB + 0.1)
                ax.plot([p[0], q[0]], [p[1], q[1]], color="0.85", lw=0.8, ls=(0, (2, 1.5)),
                        zorder=0)
    for x, y in lay.switches:
        ax.add_patch(patches.Rectangle((x - 0.22, y - 0.16), 0.44, 0.32, fc="0.9", ec="0.6",
                                       lw=0.6, zorder=1))


def _nodes(ax, lay, patches, colors, owned, root):
    fs = 7 if len(lay.pos) <= 32 else 5
    for r, (x, y) in enumerate(lay.pos):
        fc = colors[r] if owned[r] else "white"
        lw = 2.4 if r == root else 0.8
        ax.add_patch(patches.Circle((x, y), _NODE_R, fc=fc, ec="black", lw=lw, zorder=3))
        ax.text(x, y, str(r), ha="center", va="center", fontsize=fs, zorder=4,
                color="white" if owned[r] and _dark(colors[r]) else "black")


def _dark(c):
    r, g, b = c[:3]
    return 0.299 * r + 0.587 * g + 0.114 * b < 0.55


def _arrow(patches, a, b, color, lw, rad, gid, head=True):
    style = "-|>" if head else "-"
    p = patches.FancyArrowPatch(a, b, arrowstyle=style, mutation_scale=7 + 2 * lw,
                                connectionstyle=f"arc3,rad={rad}", color=color, lw=lw,
                                shrinkA=0, shrinkB=0, zorder=2)
    p.set_gid(gid)
    return p


def _transfer(ax, lay, patches, s, d, color, lw, label, gid="transfer"):
    a, b = lay.pos[s], lay.pos[d]
    vec = lay.wrap.get((s, d))
    if vec is not None:
        side = np.array([vec[1], -vec[0]]) * _LANE  # keep right, as on the straight links
        p0 = a + vec * _NODE_R + side
        ax.add_patch(_arrow(patches, p0, a + vec * (_NODE_R + _STUB) + side, color, lw, 0.0,
                            gid + "-stub", head=False))
        q1 = b - vec * _NODE_R + side
        ax.add_patch(_arrow(patches, b - vec * (_NODE_R + _STUB) + side, q1, color, lw, 0.0,
                            gid))
        if label:
            _label(ax, b - vec * (_NODE_R + _STUB * 0.6) + side, label, color)
        return
    delta = b - a
    dist = float(np.hypot(*delta))
    unit = delta / dist
    side = np.array([unit[1], -unit[0]]) * _LANE
    rad = 0.0
    if lay.bow is not None and abs(delta[1]) < 1e-9:
        # along a row of ranks: arcs bow away from the switches; the two directions of a pair
        # get different heights so they do not coincide (arc3 bends to the right of travel for
        # rad > 0, so the sign flips with the direction)
        right = delta[0] > 0
        # long arcs flatter, so that none is deeper than _ARC_DEPTH / 2
        rad = min(lay.arc, _ARC_DEPTH / dist) * lay.bow[s] * (1.0 if right else -0.7)
    elif lay.near is not None and (s, d) not in lay.near:
        # a multi-hop transfer on a grid (dbtree, rhd): bent, so it does not run through the
        # ranks on the straight line; it travels the dimension-order route
        rad = lay.arc
    if rad:
        side = np.zeros(2)
    p0, p1 = a + unit * _NODE_R + side, b - unit * _NODE_R + side
    ax.add_patch(_arrow(patches, p0, p1, color, lw, rad, gid))
    if label:
        if rad:
            # the arc's apex: arc3 puts its control point rad * |p1 - p0| off the chord
            at = (p0 + p1) / 2 + rad * np.array([p1[1] - p0[1], p0[0] - p1[0]]) / 2
        else:
            # past the middle, towards the receiver: crossing chords keep their labels apart
            at = p0 + 0.62 * (p1 - p0) + side * 1.5
        _label(ax, at, label, color)


def _label(ax, xy, text, color):
    ax.text(xy[0], xy[1], text, fontsize=6, ha="center", va="center", color="black", zorder=5,
            bbox=dict(boxstyle="round,pad=0.12", fc="white", ec=color, lw=0.6))
