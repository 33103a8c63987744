"""The numpy MLP of the trainer, with its backward pass cut into LayerPipe's tasks.

Layer ``l`` computes ``z_l = a_(l-1) @ W_l + b_l`` and ``a_l = act(z_l)`` (the last layer's
``z`` are the logits of a softmax cross-entropy). With ``delta_l`` = dLoss/dz_l:

* ``wgrad``  (task W): ``dW_l = a_(l-1).T @ delta_l``, ``db_l = delta_l.sum(0)``;
* ``bmm``    (task B, matrix product): ``g = delta_l @ W_l.T`` = dLoss/da_(l-1);
* ``bew``    (task B, element-wise): ``delta_(l-1) = g * act'(z_(l-1))``, computed from the
  activation ``a_(l-1)`` itself (relu: ``a > 0``; tanh: ``1 - a**2``).

The loss is the sum over the batch of the cross-entropy divided by ``scale`` (the global
mini-batch size), so gradients of micro-batches and replicas simply add up.
"""

from __future__ import annotations

import time

import numpy as np

ACTIVATIONS = ("relu", "tanh")
DEFAULT_DEPTH = 4      # hidden layers
DEFAULT_WIDTH = 128
DEFAULT_BATCH = 64


def layer_sizes(n_in, n_out, depth, width):
    return [n_in] + [width] * depth + [n_out]


def init_params(sizes, seed=0, dtype=np.float64):
    """He-initialised weights and zero biases, the same on every process for a given seed."""
    rng = np.random.default_rng(seed)
    params = []
    for fan_in, fan_out in zip(sizes[:-1], sizes[1:]):
        w = rng.standard_normal((fan_in, fan_out)) * np.sqrt(2.0 / fan_in)
        params.append((w.astype(dtype), np.zeros(fan_out, dtype=dtype)))
    return params


def act(z, kind):
    if kind == "relu":
        return np.maximum(z, 0.0)
    if kind == "tanh":
        return np.tanh(z)
    raise ValueError(f"unknown activation {kind!r}; choose from {', '.join(ACTIVATIONS)}")


def act_grad_from_output(a, kind):
    if kind == "relu":
        return (a > 0).astype(a.dtype)
    if kind == "tanh":
        return 1.0 - a * a
    raise ValueError(f"unknown activation {kind!r}")


def forward_layer(w, b, a_prev, kind, last):
    z = a_prev @ w + b
    return z if last else act(z, kind)


def loss_and_delta(logits, y, scale):
    """Summed cross-entropy / scale, and dLoss/dlogits."""
    z = logits - logits.max(axis=1, keepdims=True)
    e = np.exp(z)
    p = e / e.sum(axis=1, keepdims=True)
    n = len(y)
    loss = -np.log(p[np.arange(n), y] + 1e-300).sum() / scale
    d = p
    d[np.arange(n), y] -= 1.0
    return loss, d / scale


def wgrad(a_prev, delta):
    return a_prev.T @ delta, delta.sum(axis=0)


def bmm(w, delta):
    return delta @ w.T


def bew(g, a_prev, kind):
    return g * act_grad_from_output(a_prev, kind)


def predict(params, x, kind):
    a = x
    for i, (w, b) in enumerate(params):
        a = forward_layer(w, b, a, kind, i == len(params) - 1)
    return a.argmax(axis=1)


def sequential_step(params, x, y, kind, scale):
    """Loss and gradients of one batch, the whole network on one process (the reference)."""
    acts = [x]
    for i, (w, b) in enumerate(params):
        acts.append(forward_layer(w, b, acts[-1], kind, i == len(params) - 1))
    loss, delta = loss_and_delta(acts[-1], y, scale)
    grads = [None] * len(params)
    for i in range(len(params) - 1, -1, -1):
        grads[i] = wgrad(acts[i], delta)
        if i > 0:
            delta = bew(bmm(params[i][0], delta), acts[i], kind)
    return loss, grads


def measure_layer_costs(sizes, kind="relu", batch=DEFAULT_BATCH, repeat=20, seed=0):
    """Seconds per layer of forward, B (bmm + bew) and W on one batch: medians of ``repeat``."""
    rng = np.random.default_rng(seed)
    params = init_params(sizes, seed)
    a = rng.standard_normal((batch, sizes[0]))
    n = len(params)
    f = np.zeros(n)
    bt = np.zeros(n)
    ewt = np.zeros(n)
    wt = np.zeros(n)
    for i, (w, b) in enumerate(params):
        last = i == n - 1
        delta = rng.standard_normal((batch, sizes[i + 1]))
        samples = {"f": [], "bmm": [], "bew": [], "w": []}
        for _ in range(repeat):
            t0 = time.perf_counter()
            out = forward_layer(w, b, a, kind, last)
            t1 = time.perf_counter()
            g = bmm(w, delta)
            t2 = time.perf_counter()
            bew(g, a, kind)
            t3 = time.perf_counter()
            wgrad(a, delta)
            t4 = time.perf_counter()
            samples["f"].append(t1 - t0)
            samples["bmm"].append(t2 - t1)
            samples["bew"].append(t3 - t2)
            samples["w"].append(t4 - t3)
        f[i] = np.median(samples["f"])
        ewt[i] = np.median(samples["bew"]) if i > 0 else 0.0
        bt[i] = np.median(samples["bmm"]) + ewt[i] if i > 0 else 0.0
        wt[i] = np.median(samples["w"])
        a = out if not last else a
    return f, bt, wt, ewt


def measure_profile(depth=None, width=None, batch=None, repeat=20, n_in=64, n_out=10,
                    kind="relu", sizes=None):
    """The :class:`~mtcoll.train.pipeline.Profile` of an MLP (seconds per task, measured):
    ``sizes`` (all layer widths, input first), or the default shape from ``depth``/``width``."""
    from ._profile import Profile

    if sizes is None:
        sizes = layer_sizes(n_in, n_out, depth or DEFAULT_DEPTH, width or DEFAULT_WIDTH)
    rows = batch or DEFAULT_BATCH
    f, b, w, ew = measure_layer_costs(sizes, kind, rows, repeat)
    names = tuple(f"fc{i + 1}({sizes[i]}x{sizes[i + 1]})" for i in range(len(sizes) - 1))
    act = np.array([rows * n for n in sizes[1:]], dtype=float)
    params = np.array([a * c + c for a, c in zip(sizes[:-1], sizes[1:])], dtype=float)
    return Profile("measured", names, f, b, w, ew, "s", act, params)
