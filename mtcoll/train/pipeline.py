"""``python -m mtcoll.train.pipeline``: clock-count model of pipeline-parallel training schedules.

After LayerPipe (Unnikrishnan and Parhi, 2021): the training of one mini-batch is a graph of
tasks per layer ``l`` -- forward ``F_l``, activation gradient ``B_l``, weight gradient ``W_l`` --
and a schedule places the tasks on ``S`` processors (pipeline stages). A list scheduler (a
processor that is free starts its ready task of highest priority; no preemption) runs the
graph and counts time in the profile's units (multiply-accumulates for ``vgg16``).

Examples::

    python -m mtcoll.train.pipeline --stages 8
    python -m mtcoll.train.pipeline --stages 7,8,9 --profile vgg16 --json
    python -m mtcoll.train.pipeline --stages 4 --profile uniform:16
    python -m mtcoll.train.pipeline --stages 2 --profile measured

Task graph (one mini-batch ``k``; layers ``1..L``; ``delta_l`` = dLoss/d(pre-activation of l)):

* ``F_l`` after ``F_(l-1)``; ``delta_L`` is known after ``F_L`` (the loss);
* ``B_l = Bmm_l + Bew_l``: ``Bmm_l`` (``delta_l @ W_l.T``, the matrix product) after ``delta_l``;
  ``Bew_l`` (times the derivative of layer ``l-1``'s activation, element-wise) after ``Bmm_l``;
  it yields ``delta_(l-1)``. The first layer has no ``B`` (nothing upstream needs it).
* ``W_l`` (``a_(l-1).T @ delta_l``) after ``delta_l``: independent of ``B_l``.

Schedules:

* ``gpipe``, ``1f1b``: synchronous; a mini-batch is ``M`` micro-batches (``--micro-batches``,
  each task costs 1/M), all forwards then all backwards (gpipe), or backward first with at most
  ``S`` micro-batches in flight (1f1b); the makespan is the time to the flush.
* ``pipedream``: asynchronous 1F1B with at most ``S`` mini-batches in flight; a layer's whole
  backward (``B_l`` then ``W_l``) is one task, so ``delta_(l-1)`` appears only after ``W_l``;
  the makespan is the steady-state time between two finished mini-batches.
* ``layerpipe``: asynchronous like pipedream, with LayerPipe's two rules: *intra-layer* --
  ``B_l`` and ``W_l`` are separate tasks, ``B`` has priority (it is on the critical path), and
  ``W_l`` of a layer at a stage boundary may run on the neighbouring stage across it;
  *inter-layer* -- ``Bew_l`` of the first layer of a stage may run on the stage before (which
  holds the activation it differentiates).

All four place forward layers in contiguous blocks (a stage owns its layers' weights). gpipe,
1f1b and pipedream use the contiguous partition of whole layers that minimises the most loaded
stage; layerpipe searches partitions and boundary moves together, minimising the most loaded
stage. Utilisation = total work / (S x makespan); bubble = 1 - utilisation.
"""

from __future__ import annotations

import argparse
import heapq
import itertools
import json
import sys
from dataclasses import dataclass, field

import numpy as np

from .._cli import entry
from . import _mlp
from ._profile import Profile

SCHEDULES = ("gpipe", "1f1b", "pipedream", "layerpipe")

#: LayerPipe's reported gain over PipeDream with 7 to 9 processors (average; best case)
PAPER = {"average_speedup": 1.25, "max_speedup": 1.80, "stages": (7, 8, 9)}


# ---------------------------------------------------------------------------------------------
# Profiles: per-layer costs
# ---------------------------------------------------------------------------------------------

VGG16_CONFIG = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M",
                512, 512, 512, "M")


def vgg16_layers(image=224, classes=1000):
    """VGG-16's 16 weight layers: (name, forward MACs, elements of the layer's input activation).

    3x3 convolutions with padding 1 (output H x W x C_out costs H*W*C_out*C_in*9 MACs), 2x2 max
    pools (no MACs), then fully connected 7*7*512 -> 4096 -> 4096 -> classes. The input
    activation's element count is that of the previous layer's output before pooling: the
    element-wise backward (ReLU derivative, and the pool's routing) runs over those elements.
    """
    layers = []
    h = image
    c = 3
    prev_out = None  # elements of the previous layer's output, before pooling
    block, idx = 1, 1
    for item in VGG16_CONFIG:
        if item == "M":
            h //= 2
            block, idx = block + 1, 1
            continue
        macs = h * h * item * c * 9
        layers.append((f"conv{block}_{idx}", macs, prev_out or 0))
        prev_out = h * h * item
        c = item
        idx += 1
    fan_in = h * h * c
    for i, out in enumerate((4096, 4096, classes)):
        layers.append((f"fc{6 + i}", fan_in * out, prev_out))
        prev_out = out
        fan_in = out
    return layers


def vgg16_tensors(image=224, classes=1000):
    """Per layer of VGG-16: elements of its output after pooling (what the next layer gets),
    and its parameters (weights and biases)."""
    act, params = [], []
    h, c = image, 3
    for i, item in enumerate(VGG16_CONFIG):
        if item == "M":
            continue
        pooled = i + 1 < len(VGG16_CONFIG) and VGG16_CONFIG[i + 1] == "M"
        h_out = h // 2 if pooled else h
        act.append(h_out * h_out * item)
        params.append(9 * c * item + item)
        h, c = h_out, item
    fan_in = h * h * c
    for out in (4096, 4096, classes):
        act.append(out)
        params.append(fan_in * out + out)
        fan_in = out
    return np.asarray(act, dtype=float), np.asarray(params, dtype=float)


def profile_vgg16():
    names, macs, ew = zip(*vgg16_layers())
    f = np.asarray(macs, dtype=float)
    ew = np.asarray(ew, dtype=float)
    b = f.copy()          # B costs the forward's MACs (the brief's cost model) ...
    b[0] = 0.0            # ... except that nothing needs the gradient of the input image
    ew[0] = 0.0
    act, params = vgg16_tensors()
    return Profile("vgg16", names, f, b, f.copy(), ew, "MAC", act, params)


def profile_uniform(layers):
    f = np.ones(layers)
    b = np.ones(layers)
    b[0] = 0.0
    return Profile(f"uniform:{layers}", tuple(f"layer{i + 1}" for i in range(layers)), f, b,
                   np.ones(layers), np.zeros(layers), "unit")


def profile_measured(depth=None, width=None, batch=None, repeat=20):
    """Per-layer F, B, W times (seconds) of the trainer's numpy MLP (its default shape)."""
    return _mlp.measure_profile(depth=depth, width=width, batch=batch, repeat=repeat)


def get_profile(spec):
    if spec == "vgg16":
        return profile_vgg16()
    if spec.startswith("uniform:"):
        n = int(spec.split(":", 1)[1])
        if n < 1:
            raise ValueError(f"profile {spec!r}: need at least one layer")
        return profile_uniform(n)
    if spec == "measured":
        return profile_measured()
    raise ValueError(f"unknown profile {spec!r}; choose vgg16, uniform:L or measured")


# ---------------------------------------------------------------------------------------------
# Placement
# ---------------------------------------------------------------------------------------------

def partition_layers(cost, stages):
    """Contiguous partition of ``cost`` into ``stages`` non-empty blocks minimising the maximum
    block sum; returns the block start indices (``stages`` of them, the first 0)."""
    cost = np.asarray(cost, dtype=float)
    n = len(cost)
    if not 1 <= stages <= n:
        raise ValueError(f"cannot split {n} layers into {stages} stages")
    pre = np.concatenate([[0.0], np.cumsum(cost)])
    inf = float("inf")
    # best[s][j]: min over partitions of layers [0, j) into s blocks of the max block sum
    best = [[inf] * (n + 1) for _ in range(stages + 1)]
    arg = [[0] * (n + 1) for _ in range(stages + 1)]
    best[0][0] = 0.0
    for s in range(1, stages + 1):
        for j in range(s, n + 1):
            for i in range(s - 1, j):
                v = max(best[s - 1][i], pre[j] - pre[i])
                if v < best[s][j]:
                    best[s][j], arg[s][j] = v, i
    starts = []
    j = n
    for s in range(stages, 0, -1):
        i = arg[s][j]
        starts.append(i)
        j = i
    return starts[::-1]


def stage_of_layers(starts, layers):
    stage = np.zeros(layers, dtype=int)
    for s, a in enumerate(starts):
        stage[a:] = s
    return stage


# What may cross the boundary in front of layer j (between layer j-1's stage and layer j's):
# W of layer j-1 moved forward, W of layer j moved back, Bew of layer j moved back.
_MOVES = tuple(itertools.product((False, True), repeat=3))


def layerpipe_placement(p: Profile, stages, starts=None):
    """Stage of every task of a layerpipe schedule: (stage_F, stage_W, stage_Bew) per layer.

    Dynamic programme over stage blocks and the moves across each boundary, minimising the most
    loaded stage (exact for this placement space). ``starts`` (the first layer of each stage)
    fixes the blocks and leaves only the moves to choose: the trainer uses it to run layerpipe
    on the same layer partition as pipedream.
    """
    n = p.layers
    if not 1 <= stages <= n:
        raise ValueError(f"cannot split {n} layers into {stages} stages")
    if starts is not None:
        starts = [int(a) for a in starts]
        if len(starts) != stages or starts[0] != 0 or starts != sorted(set(starts)) \
                or starts[-1] >= n:
            raise ValueError(f"bad partition {starts} for {stages} stages of {n} layers")
    full = p.f + p.b + p.w
    pre = np.concatenate([[0.0], np.cumsum(full)])
    inf = float("inf")
    none = (False, False, False)

    def load(i, j, left, right):
        """Load of a stage holding layers [i, j), with moves ``left`` at i and ``right`` at j."""
        v = pre[j] - pre[i]
        if left is not None:
            wfwd, wback, ewback = left
            if wfwd:
                v += p.w[i - 1]
            if wback:
                v -= p.w[i]
            if ewback:
                v -= p.ew[i]
        if right is not None:
            wfwd, wback, ewback = right
            if wfwd:
                v -= p.w[j - 1]
            if wback:
                v += p.w[j]
            if ewback:
                v += p.ew[j]
        return v

    def legal(i, j, left, right):
        # a single-layer stage cannot send its one W both ways
        return not (j - i == 1 and left is not None and right is not None
                    and left[1] and right[0])

    # best[s][(j, move at j)]: stages 0..s-1 cover [0, j); the max load of those stages
    best = {(0, none): (0.0, None)}
    layers_of = [dict() for _ in range(stages + 1)]
    layers_of[0] = best
    for s in range(1, stages + 1):
        cur = {}
        last = s == stages
        for (i, left), (val, _) in layers_of[s - 1].items():
            if val == inf:
                continue
            if last:
                jrange = [n]
            elif starts is not None:
                jrange = [starts[s]] if starts[s] > i else []
            else:
                jrange = range(i + 1, n - (stages - s) + 1)
            for j in jrange:
                rights = [None] if last else _MOVES
                for right in rights:
                    lft = None if s == 1 else left
                    if not legal(i, j, lft, right):
                        continue
                    v = max(val, load(i, j, lft, right))
                    key = (j, right if right is not None else none)
                    if v < cur.get(key, (inf,))[0]:
                        cur[key] = (v, (i, left))
        layers_of[s] = cur
    # backtrack
    key = min((k for k in layers_of[stages] if k[0] == n), key=lambda k: layers_of[stages][k][0])
    bound = layers_of[stages][key][0]
    starts, moves = [], []
    for s in range(stages, 0, -1):
        _, prev = layers_of[s][key]
        starts.append(prev[0])
        moves.append(prev[1])  # move at the block's start boundary
        key = prev
    starts, moves = starts[::-1], moves[::-1]
    stage_f = stage_of_layers(starts, n)
    stage_w = stage_f.copy()
    stage_ew = stage_f.copy()
    for s in range(1, stages):
        j = starts[s]
        wfwd, wback, ewback = moves[s]
        if wfwd:
            stage_w[j - 1] = s
        if wback:
            stage_w[j] = s - 1
        if ewback:
            stage_ew[j] = s - 1
    return stage_f, stage_w, stage_ew, bound


# ---------------------------------------------------------------------------------------------
# Task graphs and the list scheduler
# ---------------------------------------------------------------------------------------------

@dataclass
class _Graph:
    proc: list = field(default_factory=list)
    dur: list = field(default_factory=list)
    prio: list = field(default_factory=list)
    deps: list = field(default_factory=list)
    label: list = field(default_factory=list)

    def add(self, proc, dur, prio, deps, label):
        self.proc.append(proc)
        self.dur.append(float(dur))
        self.prio.append(prio)
        self.deps.append(list(deps))
        self.label.append(label)
        return len(self.proc) - 1


# priority classes: lower runs first
_PB, _PW, _PF = 0, 1, 2


def _add_forward(g, k, p: Profile, stage_f, scale, fclass, entry_deps, version_deps=None):
    """Forward tasks of batch ``k``; returns their ids (the last one yields ``delta_L``).

    ``version_deps[l]``: the task whose weight gradient ``F_l`` must see applied (weight
    stashing with PipeDream's delays; see :func:`weight_delay`), or absent.
    """
    ids = []
    for l in range(p.layers):
        deps = [ids[-1]] if ids else list(entry_deps)
        if version_deps and l in version_deps:
            deps.append(version_deps[l])
        ids.append(g.add(stage_f[l], p.f[l] * scale, (fclass, k, l), deps, (k, "F", l)))
    return ids


def _add_backward(g, k, p: Profile, stage_f, stage_w, stage_ew, split, scale, delta):
    """Backward tasks of batch ``k``, starting once task ``delta`` (delta_L) is done.

    Returns ``{layer: id of the task that yields its weight gradient}`` (W, or the whole BW).
    """
    wtask = {}
    for l in range(p.layers - 1, -1, -1):
        if split:
            wtask[l] = g.add(stage_w[l], p.w[l] * scale, (_PW, k, -l), [delta], (k, "W", l))
            if l > 0:
                mm = g.add(stage_f[l], (p.b[l] - p.ew[l]) * scale, (_PB, k, -l), [delta],
                           (k, "Bmm", l))
                ew = g.add(stage_ew[l], p.ew[l] * scale, (_PB, k, -l), [mm], (k, "Bew", l))
                delta = ew
        else:
            # the whole backward of a layer is one task: delta_(l-1) only after W_l
            bw = g.add(stage_f[l], (p.b[l] + p.w[l]) * scale, (_PB, k, -l), [delta],
                       (k, "BW", l))
            wtask[l] = bw
            delta = bw
    return wtask


def _add_batch(g, k, p: Profile, stage_f, stage_w, stage_ew, split, scale, fclass, entry_deps,
               version_deps=None):
    """Add the tasks of mini-batch (or micro-batch) ``k``; return (completion sentinel, the
    weight-gradient task of every layer)."""
    first = len(g.proc)
    fwd = _add_forward(g, k, p, stage_f, scale, fclass, entry_deps, version_deps)
    wtask = _add_backward(g, k, p, stage_f, stage_w, stage_ew, split, scale, fwd[-1])
    done = g.add(None, 0.0, (0, k, 0), range(first, len(g.proc)), (k, "done", -1))
    return done, wtask


def weight_version(k, delay):
    """The weight version (updates applied) that mini-batch ``k``'s forward uses on every layer:
    the updates of mini-batches ``0 .. k - delay``. The asynchronous schedules use
    ``delay`` = the in-flight limit (PipeDream's *vertical sync*: every stage uses the version
    the first stage can hold), which the admission of mini-batches already implies; the
    arithmetic is then the same for any partition and any placement of the W tasks."""
    return max(0, k - delay + 1)


def list_schedule(g: _Graph, procs):
    """Run the graph: a free processor starts its ready task with the smallest priority.

    Returns the finish time of every task. Tasks with ``proc None`` take no time and no processor.
    """
    n = len(g.proc)
    waiting = [len(d) for d in g.deps]
    succ = [[] for _ in range(n)]
    for t, ds in enumerate(g.deps):
        for d in ds:
            succ[d].append(t)
    finish = [None] * n
    ready = [[] for _ in range(procs)]
    busy = [False] * procs
    running = []  # (end, seq, task)
    seq = itertools.count()
    now = 0.0

    def release(t):
        if g.proc[t] is None:
            finish[t] = now
            for s in succ[t]:
                waiting[s] -= 1
                if waiting[s] == 0:
                    release(s)
        else:
            heapq.heappush(ready[g.proc[t]], (g.prio[t], t))

    for t in range(n):
        if waiting[t] == 0:
            release(t)
    while True:
        for q in range(procs):
            if not busy[q] and ready[q]:
                _, t = heapq.heappop(ready[q])
                busy[q] = True
                heapq.heappush(running, (now + g.dur[t], next(seq), t))
        if not running:
            break
        now, _, t = heapq.heappop(running)
        done = [t]
        while running and running[0][0] <= now:
            done.append(heapq.heappop(running)[2])
        for t in done:
            busy[g.proc[t]] = False
            finish[t] = now
            for s in succ[t]:
                waiting[s] -= 1
                if waiting[s] == 0:
                    release(s)
    if any(f is None for f in finish):
        raise RuntimeError("list schedule deadlocked (a dependency cycle)")
    return finish


def placement(p: Profile, schedule, stages, starts=None):
    """``(stage_f, stage_w, stage_ew, bound)``: the stage of every layer's F (and Bmm), W and
    Bew. gpipe, 1f1b and pipedream keep each layer whole on the min-max partition (or
    ``starts``); layerpipe may move boundary W and Bew tasks (:func:`layerpipe_placement`)."""
    if schedule not in SCHEDULES:
        raise ValueError(f"unknown schedule {schedule!r}; choose from {', '.join(SCHEDULES)}")
    if schedule == "layerpipe":
        return layerpipe_placement(p, stages, starts)
    full = p.f + p.b + p.w
    if starts is None:
        starts = partition_layers(full, stages)
    elif len(starts) != stages or starts[0] != 0 or list(starts) != sorted(set(starts)) \
            or starts[-1] >= p.layers:
        raise ValueError(f"bad partition {list(starts)} for {stages} stages of {p.layers} layers")
    stage_f = stage_of_layers(starts, p.layers)
    loads = np.zeros(stages)
    np.add.at(loads, stage_f, full)
    return stage_f, stage_f.copy(), stage_f.copy(), float(loads.max())


def simulate(p: Profile, schedule, stages, micro_batches=None, batches=None, in_flight=None,
             starts=None, moves=None):
    """List-schedule one schedule; return ``(record, orders)``.

    ``record`` is the result dict of :func:`run_schedule`. ``orders[q]`` is processor ``q``'s
    tasks in the order the list scheduler started them, as ``(batch, kind, layer)`` with kind
    ``F``, ``Bmm``, ``Bew``, ``W`` (layerpipe) or ``BW`` (the whole backward of a layer): the
    trainer runs exactly these lists. For gpipe and 1f1b ``batch`` is the micro-batch of one
    mini-batch (every mini-batch repeats the list); for pipedream and layerpipe it is the
    mini-batch, over all ``batches`` of the run.

    ``in_flight``: the most (micro-)batches admitted at once by 1f1b, pipedream and layerpipe
    (default ``S``, PipeDream's choice for a straight pipeline). ``starts`` fixes the first
    layer of each stage; ``moves = (stage_w, stage_bew)`` (layerpipe) fixes where every W and
    Bew runs instead of the model's choice (tests use it to exercise every kind of move).
    """
    limit = in_flight or stages
    stage_f, stage_w, stage_ew, bound = placement(p, schedule, stages, starts)
    if moves is not None:
        if schedule != "layerpipe":
            raise ValueError(f"{schedule} keeps every layer's tasks on its stage: no moves")
        stage_w, stage_ew = (np.asarray(m, dtype=int) for m in moves)
        for l in range(p.layers):
            if abs(stage_w[l] - stage_f[l]) > 1 or not 0 <= stage_f[l] - stage_ew[l] <= 1 \
                    or (stage_ew[l] != stage_f[l] and (l == 0 or stage_f[l - 1] == stage_f[l])):
                raise ValueError(f"moves: layer {l} cannot run W on stage {stage_w[l]} and Bew "
                                 f"on stage {stage_ew[l]} (its F is on stage {stage_f[l]})")
    split = schedule == "layerpipe"
    loads = np.zeros(stages)
    np.add.at(loads, stage_f, p.f + p.b - p.ew)
    np.add.at(loads, stage_w, p.w)
    np.add.at(loads, stage_ew, p.ew)
    g = _Graph()
    if schedule == "gpipe":
        # every forward of the mini-batch, then (after the last loss) every backward
        m = micro_batches or 4 * stages
        lasts = [_add_forward(g, k, p, stage_f, 1.0 / m, _PF, [])[-1] for k in range(m)]
        turn = g.add(None, 0.0, (0, 0, 0), lasts, (-1, "flush", -1))
        for k in range(m):
            _add_backward(g, k, p, stage_f, stage_w, stage_ew, False, 1.0 / m, turn)
        finish = list_schedule(g, stages)
        makespan = max(finish)
        extra = {"micro_batches": m}
    elif schedule == "1f1b":
        # backward first, at most S micro-batches in flight, a flush at the end
        m = micro_batches or 4 * stages
        sentinels = []
        for k in range(m):
            entry = [sentinels[k - limit]] if k >= limit else []
            sentinels.append(_add_batch(g, k, p, stage_f, stage_w, stage_ew, False, 1.0 / m,
                                        _PF, entry)[0])
        finish = list_schedule(g, stages)
        makespan = max(finish)
        extra = {"micro_batches": m}
    else:
        # asynchronous: at most `limit` mini-batches in flight, and F_l of mini-batch k waits
        # for the weight gradient its stashed version includes (the trainer's arithmetic)
        nb = batches or 16 * stages + 32
        sentinels, wtasks = [], []
        for k in range(nb):
            entry = [sentinels[k - limit]] if k >= limit else []
            vdeps = {}
            j = weight_version(k, limit) - 1     # the last update F_l(k) must see
            if j >= 0:
                vdeps = dict(wtasks[j])
            done, wtask = _add_batch(g, k, p, stage_f, stage_w, stage_ew, split, 1.0, _PF,
                                     entry, vdeps)
            sentinels.append(done)
            wtasks.append(wtask)
        finish = list_schedule(g, stages)
        done = [finish[s] for s in sentinels]
        # the middle half: away from the fill at the start and the drain at the end, where
        # deferred W tasks complete without new work behind them
        a, b = window_bounds(nb)
        makespan = (done[b] - done[a]) / (b - a)
        first = done[0]
        extra = {"mini_batches_simulated": nb, "window": b - a, "latency": first,
                 "in_flight": limit}
    util = p.total / (stages * makespan)
    starts = [int(np.argmax(stage_f == s)) for s in range(stages)]
    moved_w = [p.names[l] for l in range(p.layers) if stage_w[l] != stage_f[l]]
    moved_ew = [p.names[l] for l in range(p.layers) if stage_ew[l] != stage_f[l]]
    rec = {
        "schedule": schedule,
        "stages": stages,
        "profile": p.name,
        "unit": p.unit,
        "makespan": float(makespan),
        "throughput": 1.0 / float(makespan),
        "utilization": float(util),
        "bubble": float(1.0 - util),
        "max_stage_load": float(loads.max()),
        "stage_loads": [float(x) for x in loads],
        "stage_first_layer": [p.names[a] for a in starts],
        "partition": starts,
        "w_moved": moved_w,
        "bew_moved": moved_ew,
        "stage_f": [int(x) for x in stage_f],
        "stage_w": [int(x) for x in stage_w],
        "stage_bew": [int(x) for x in stage_ew],
    }
    rec.update(extra)
    start = [f - d for f, d in zip(finish, g.dur)]
    orders = [[] for _ in range(stages)]
    for t in sorted(range(len(g.proc)), key=lambda t: (start[t], t)):
        if g.proc[t] is not None:
            orders[g.proc[t]].append(g.label[t])
    return rec, orders


def window_bounds(nb):
    """The steady-state window of a run of ``nb`` mini-batches: mini-batches ``a`` to ``b``
    (the middle half); the period is ``(done[b] - done[a]) / (b - a)``."""
    return nb // 4, 3 * nb // 4


def run_schedule(p: Profile, schedule, stages, micro_batches=None, batches=None, in_flight=None,
                 starts=None, moves=None):
    """List-schedule one schedule; return its result record (a dict): see :func:`simulate`."""
    return simulate(p, schedule, stages, micro_batches, batches, in_flight, starts, moves)[0]


def compare(p: Profile, stages_list, schedules=SCHEDULES, micro_batches=None, in_flight=None):
    """Every schedule at every stage count; ``in_flight`` is a multiple of S (default 1)."""
    results = [run_schedule(p, s, S, micro_batches,
                            in_flight=None if in_flight is None else int(in_flight * S))
               for S in stages_list for s in schedules]
    summary = {}
    if "layerpipe" in schedules and "pipedream" in schedules:
        by = {(r["schedule"], r["stages"]): r for r in results}
        sp = {S: by[("pipedream", S)]["makespan"] / by[("layerpipe", S)]["makespan"]
              for S in stages_list}
        bd = {S: by[("pipedream", S)]["max_stage_load"] / by[("layerpipe", S)]["max_stage_load"]
              for S in stages_list}
        summary = {"layerpipe_over_pipedream": {str(k): v for k, v in sp.items()},
                   "average_speedup": float(np.mean(list(sp.values()))),
                   "bound_speedup": {str(k): v for k, v in bd.items()},
                   "average_bound_speedup": float(np.mean(list(bd.values()))),
                   "paper": PAPER}
    return results, summary


# ---------------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------------

def _parser():
    doc = __doc__.splitlines()
    p = argparse.ArgumentParser(prog="python -m mtcoll.train.pipeline", description=doc[0],
                                epilog="\n".join(doc[2:]),
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--stages", default="7,8,9",
                   help="number of processors S, or a comma list (default: %(default)s)")
    p.add_argument("--profile", default="vgg16",
                   help="vgg16, uniform:L or measured (default: %(default)s)")
    p.add_argument("--schedules", default=",".join(SCHEDULES),
                   help="comma list (default: all)")
    p.add_argument("--micro-batches", type=int, default=None, metavar="M",
                   help="micro-batches per mini-batch of gpipe and 1f1b (default: 4*S)")
    p.add_argument("--in-flight", type=float, default=None, metavar="X",
                   help="batches admitted at once by 1f1b/pipedream/layerpipe, in multiples of S "
                        "(default: 1)")
    p.add_argument("--json", nargs="?", const="-", default=None, metavar="FILE",
                   help="write one JSON object to FILE (no FILE or '-': stdout, instead of the table)")
    return p


UNITS = {"MAC": "multiply-accumulates per mini-batch of one image",
         "s": "seconds per mini-batch", "unit": "cost units per mini-batch"}


def _table(results, summary, out):
    unit = results[0]["unit"] if results else ""
    print(f"makespan = time per mini-batch, bound = work of the busiest stage, both in {unit} "
          f"({UNITS.get(unit, unit)})", file=out)
    mk, bd = f"makespan[{unit}]", f"bound[{unit}]"
    print(f"{'schedule':<10} {'S':>2} {mk:>13} {bd:>11} {'util':>6} {'bubble':>6} "
          f"{'vs pipedream':>12}  first layer of each stage / moved tasks", file=out)
    by = {(r["schedule"], r["stages"]): r for r in results}
    for r in results:
        base = by.get(("pipedream", r["stages"]))
        sp = f"{base['makespan'] / r['makespan']:.3f}x" if base else "-"
        moved = ""
        if r["w_moved"] or r["bew_moved"]:
            moved = f"  W moved: {','.join(r['w_moved']) or '-'}; Bew moved: " \
                    f"{','.join(r['bew_moved']) or '-'}"
        print(f"{r['schedule']:<10} {r['stages']:>2} {r['makespan']:>13.4g} "
              f"{r['max_stage_load']:>11.4g} "
              f"{r['utilization']:>6.3f} {r['bubble']:>6.3f} {sp:>12}  "
              f"{','.join(r['stage_first_layer'])}{moved}", file=out)
    if summary:
        print(f"layerpipe over pipedream, average over S={','.join(summary['layerpipe_over_pipedream'])}: "
              f"{summary['average_speedup']:.3f}x (paper: {PAPER['average_speedup']}x average, "
              f"up to {PAPER['max_speedup']}x); by the busiest stage (bound): "
              f"{summary['average_bound_speedup']:.3f}x", file=out)


def main(argv=None):
    args = _parser().parse_args(argv)
    stages_list = [int(s) for s in str(args.stages).split(",") if s.strip()]
    schedules = [s.strip() for s in args.schedules.split(",") if s.strip()]
    bad = [s for s in schedules if s not in SCHEDULES]
    if bad:
        raise SystemExit(f"unknown schedule(s) {', '.join(bad)}; choose from {', '.join(SCHEDULES)}")
    p = get_profile(args.profile)
    skipped = [S for S in stages_list if not 1 <= S <= p.layers]
    if skipped:
        print(f"note: {p.name} has {p.layers} layers; skipping S={','.join(map(str, skipped))}",
              file=sys.stderr)
    stages_list = [S for S in stages_list if 1 <= S <= p.layers]
    if not stages_list:
        raise SystemExit(f"no stage count fits the {p.layers} layers of {p.name}")
    results, summary = compare(p, stages_list, schedules, args.micro_batches, args.in_flight)
    obj = {"profile": {"name": p.name, "unit": p.unit, "layers": list(p.names),
                       "f": p.f.tolist(), "b": p.b.tolist(), "w": p.w.tolist(),
                       "ew": p.ew.tolist()},
           "results": results, "summary": summary}
    if args.json is not None:
        text = json.dumps(obj, indent=1)
        if args.json == "-":
            print(text)
        else:
            with open(args.json, "w") as fh:
                fh.write(text + "\n")
            _table(results, summary, sys.stdout)
    else:
        _table(results, summary, sys.stdout)
    return obj


def _main():
    main()
    return 0


if __name__ == "__main__":
    entry(_main)      # a closed pipe (| head) ends the tool quietly
