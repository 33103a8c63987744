"""The per-layer cost profile that the schedule model schedules and the trainer emulates.

A module of its own so that the model (``schedule``) and the MLP (``_model``, which measures
a profile) both import it without importing each other.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Profile:
    """Per-layer task costs. ``ew[l]`` is the element-wise part of ``B_l`` (included in ``b``)."""

    name: str
    names: tuple
    f: np.ndarray
    b: np.ndarray
    w: np.ndarray
    ew: np.ndarray
    unit: str
    #: elements of each layer's output activation as it travels on (the trainer's emulation
    #: sends messages of these sizes), and of each layer's weights; None: 1024 each
    act: np.ndarray = None
    params: np.ndarray = None

    @property
    def layers(self):
        return len(self.f)

    @property
    def total(self):
        return float(self.f.sum() + self.b.sum() + self.w.sum())
