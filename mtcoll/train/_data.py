"""Data sets of the trainer: scikit-learn's bundled digits, and a synthetic teacher-student set.

Both return ``(x_train, y_train, x_test, y_test)`` in float64 / int64, the same on every process:
the split and the synthetic data come from fixed seeds, and features are standardised with the
training set's mean and standard deviation.
"""

from __future__ import annotations

import numpy as np

DATASETS = ("digits", "teacher")


def _standardise(x_train, x_test):
    mu = x_train.mean(axis=0)
    sd = x_train.std(axis=0)
    sd[sd == 0] = 1.0  # constant pixels (the digits' borders)
    return (x_train - mu) / sd, (x_test - mu) / sd


def digits(test_fraction=0.2, seed=0):
    """The 1797 8x8 digits bundled with scikit-learn (no download); a fixed shuffled split."""
    try:
        from sklearn.datasets import load_digits
    except ImportError as exc:  # the data set ships with scikit-learn, the `train` extra
        raise ImportError("the digits data set needs scikit-learn: pip install 'mtcoll[train]' "
                          "(or use --data teacher)") from exc
    d = load_digits()
    x = d.data.astype(np.float64)
    y = d.target.astype(np.int64)
    order = np.random.default_rng(seed).permutation(len(y))
    n_test = int(round(test_fraction * len(y)))
    test, train = order[:n_test], order[n_test:]
    x_train, x_test = _standardise(x[train], x[test])
    return x_train, y[train], x_test, y[test]


def teacher(n_train=1024, n_test=512, n_in=32, n_hidden=64, n_out=10, seed=0):
    """Labels of a random one-hidden-layer tanh teacher network on Gaussian inputs."""
    rng = np.random.default_rng(seed + 1000)
    w1 = rng.standard_normal((n_in, n_hidden)) / np.sqrt(n_in)
    w2 = rng.standard_normal((n_hidden, n_out)) / np.sqrt(n_hidden)
    x = rng.standard_normal((n_train + n_test, n_in))
    y = (np.tanh(x @ w1) @ w2).argmax(axis=1).astype(np.int64)
    x_train, x_test = _standardise(x[:n_train], x[n_train:])
    return x_train, y[:n_train], x_test, y[n_train:]


def load(name, seed=0):
    if name == "digits":
        return digits(seed=seed)
    if name == "teacher":
        return teacher(seed=seed)
    raise ValueError(f"unknown data set {name!r}; choose from {', '.join(DATASETS)}")
