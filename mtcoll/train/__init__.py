"""Pipeline- and data-parallel training of a numpy MLP over mtcoll, after LayerPipe.

A consumer of mtcoll's public API (``mtcoll.Comm``, ``Iallreduce``, ``waitall``); the library
never imports it. ``python -m mtcoll.train`` runs the trainer under ``mpiexec -n S*R``;
``python -m mtcoll.train.pipeline`` is the clock-count model of the pipeline schedules. See
``docs/training.md``.
"""
