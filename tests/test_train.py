"""The LayerPipe trainer (mtcoll.train): stages, weight stashing, schedules against sequential.

Serial tests check one stage's arithmetic; MPI tests (``-m mpi``) run the schedules in-process on
the first 2 or 4 ranks of the world; the slow serial tests launch ``mpiexec -n 4`` themselves
and train on digits to the accuracy docs/training.md promises.
"""

from __future__ import annotations

import json
from pathlib import Path

import _mpirun
import numpy as np
import pytest
from mpi4py import MPI

from mtcoll.train import _model
from mtcoll.train._pipeline import Stage
from mtcoll.train._trainer import Config, run, run_sequential

ROOT = Path(__file__).resolve().parent.parent


def _setup(sizes=(6, 8, 7, 5, 3), rows=4, seed=1):
    rng = np.random.default_rng(seed)
    params = _model.init_params(list(sizes), seed)
    x = rng.standard_normal((rows, sizes[0]))
    y = rng.integers(0, sizes[-1], rows)
    return params, x, y


def _stage_grads(stage):
    return [(gw.copy(), gb.copy()) for gw, gb in stage.grads]


@pytest.mark.parametrize("split", [False, True])
def test_two_stages_give_the_sequential_gradient(split):
    """Whole-backward and LayerPipe's split (g sent upstream, element-wise part applied there)."""
    params, x, y = _setup()
    _, ref = _model.sequential_step(params, x, y, "tanh", len(y))
    up = Stage(params[:2], "tanh", first=True, last=False, lr=0.1, momentum=0.0,
               split_backward=split)
    down = Stage(params[2:], "tanh", first=False, last=True, lr=0.1, momentum=0.0,
                 split_backward=split)
    h = up.forward(0, x)
    logits = down.forward(0, h)
    _, delta = _model.loss_and_delta(logits, y, len(y))
    delta = delta.copy()
    sent = []
    down.backward(0, delta, final=True, send_up=sent.append)
    assert len(sent) == 1
    if split:
        # the matrix-product part only: delta_3 @ W_3.T, not yet times tanh'(z)
        a2 = _model.forward_layer(*params[2], h, "tanh", False)
        delta2 = _model.bew(_model.bmm(params[3][0], delta), a2, "tanh")
        np.testing.assert_allclose(sent[0], _model.bmm(params[2][0], delta2), rtol=1e-12)
    up.backward(0, sent[0], final=True, send_up=None)
    got = _stage_grads(up) + _stage_grads(down)
    for (gw, gb), (rw, rb) in zip(got, ref):
        np.testing.assert_allclose(gw, rw, rtol=1e-12, atol=1e-15)
        np.testing.assert_allclose(gb, rb, rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("split", [False, True])
def test_backward_uses_the_stashed_weights(split):
    """Forward of mb 0, an update, forward of mb 1, then backward of mb 0: the backward must use
    the weights mb 0's forward used (PipeDream's weight stashing), not the updated ones."""
    params, x, y = _setup(sizes=(6, 8, 7, 3))
    st = Stage(params, "relu", first=True, last=True, lr=0.5, momentum=0.0,
               split_backward=split)
    out0 = st.forward(0, x)
    _, delta0 = _model.loss_and_delta(out0, y, len(y))
    # an update from some other mini-batch's gradient: a new weight version
    for gw, gb in st.grads:
        gw[...] = 1.0
        gb[...] = 1.0
    st.update()
    assert st.version == 1
    new_params = st.params
    st.forward(1, x)
    st.zero_grads()
    st.backward(0, delta0, final=True)
    assert st.log[-1] == (0, 0, 1)   # mb 0 ran with version 0 while version 1 was current
    _, ref_old = _model.sequential_step(params, x, y, "relu", len(y))
    for (gw, _), (rw, _) in zip(_stage_grads(st), ref_old):
        np.testing.assert_allclose(gw, rw, rtol=1e-12)
    # and it is not what the current weights give (the test would not notice otherwise)
    _, ref_new = _model.sequential_step(new_params, x, y, "relu", len(y))
    assert not np.allclose(_stage_grads(st)[0][0], ref_new[0][0])
    st.zero_grads()
    st.backward(1, delta0, final=True)
    assert st.log[-1] == (1, 1, 1)


def _tiny(schedule, stages, replicas, **kw):
    base = dict(schedule=schedule, stages=stages, replicas=replicas, data="teacher", depth=3,
                width=16, epochs=1, batch=16, micro_batches=2, lr=0.05, momentum=0.9,
                algorithm="multitree", bucket_bytes=512)
    base.update(kw)
    return Config(**base)


def _sub(min_size):
    """The first 4 (or 2) ranks of the world, COMM_NULL elsewhere; (comm, stages, replicas)."""
    world = MPI.COMM_WORLD
    n = 4 if world.Get_size() >= 4 else 2
    comm = world.Split(0 if world.Get_rank() < n else MPI.UNDEFINED, world.Get_rank())
    return comm, 2, n // 2


@pytest.mark.mpi(min_size=2)
@pytest.mark.parametrize("schedule", ["gpipe", "1f1b"])
def test_synchronous_schedules_match_sequential(schedule):
    comm, S, R = _sub(2)
    if comm == MPI.COMM_NULL:
        return
    try:
        cfg = _tiny(schedule, S, R, partition=[0, 3])
        steps = 5
        res = run(cfg, comm, steps=steps)
        if comm.Get_rank() == 0:
            ref = run_sequential(_tiny("sequential", 1, 1), steps=steps)
            for (w, b), (rw, rb) in zip(res["params"], ref["params"]):
                np.testing.assert_allclose(w, rw, rtol=1e-9, atol=1e-12)
                np.testing.assert_allclose(b, rb, rtol=1e-9, atol=1e-12)
            # and the weights did move: the comparison is not between two initial states
            init = _model.init_params([32, 16, 16, 16, 10], 0)
            assert not np.allclose(res["params"][0][0], init[0][0])
    finally:
        comm.Free()


@pytest.mark.mpi(min_size=2)
def test_layerpipe_computes_what_pipedream_computes():
    """Same staleness and stashing: the split only moves work, so the weights agree."""
    comm, S, R = _sub(2)
    if comm == MPI.COMM_NULL:
        return
    try:
        out = {s: run(_tiny(s, S, R, depth=4, partition=[0, 2]), comm, steps=6)
               for s in ("pipedream", "layerpipe")}
        if comm.Get_rank() == 0:
            for (w, _), (rw, _) in zip(out["layerpipe"]["params"], out["pipedream"]["params"]):
                np.testing.assert_allclose(w, rw, rtol=1e-9, atol=1e-12)
            # asynchronous: not the sequential result (stale weights in stage 0's updates)
            ref = run_sequential(_tiny("sequential", 1, 1, depth=4), steps=6)
            assert not np.allclose(out["pipedream"]["params"][0][0], ref["params"][0][0])
    finally:
        comm.Free()


def test_config_rejects_bad_layouts():
    with pytest.raises(ValueError):
        Config(schedule="sequential", stages=2).check()
    with pytest.raises(ValueError):
        Config(schedule="gpipe", batch=30, replicas=2, micro_batches=4).check()
    with pytest.raises(ValueError):
        Config(schedule="zb").check()
    with pytest.raises(ValueError):
        Config(stages=9, depth=4).check()


# ---- serial tests that launch mpiexec -n 4 -------------------------------------------------

def _launch(n, args, timeout=240):
    out = _mpirun.run(n, ["-m", "mpi4py", "-m", "mtcoll.train", *args, "--json"], timeout)
    assert out.returncode == 0, out.stdout + out.stderr
    return json.loads(out.stdout)


#: epochs within which pipedream and layerpipe reach 95% on digits (docs/training.md)
DIGITS_EPOCHS = 10


@pytest.fixture(scope="module")
def sequential_digits():
    pytest.importorskip("sklearn")
    from threadpoolctl import threadpool_limits

    with threadpool_limits(1):
        return run_sequential(Config(schedule="sequential", stages=1, replicas=1,
                                     epochs=DIGITS_EPOCHS))


@pytest.mark.slow
@pytest.mark.parametrize("schedule", ["pipedream", "layerpipe"])
def test_async_schedules_learn_digits(schedule, sequential_digits):
    res = _launch(4, ["--stages", "2", "--replicas", "2", "--schedule", schedule,
                      "--epochs", str(DIGITS_EPOCHS)])
    assert [e["epoch"] for e in res["epochs"]] == list(range(1, DIGITS_EPOCHS + 1))
    for e in res["epochs"]:
        assert {"epoch", "loss", "test_accuracy", "seconds"} <= set(e)
    acc = res["epochs"][-1]["test_accuracy"]
    ref = sequential_digits["epochs"][-1]["test_accuracy"]
    assert acc >= 0.95, res["epochs"]
    assert acc >= ref - 0.01, (acc, ref)


def test_cli_runs_gpipe_on_4_ranks_like_sequential():
    res = _launch(4, ["--stages", "2", "--replicas", "2", "--schedule", "gpipe", "--data",
                      "teacher", "--epochs", "2", "--depth", "3", "--width", "16"], timeout=120)
    ref = run_sequential(Config(schedule="sequential", stages=1, replicas=1, data="teacher",
                                epochs=2, depth=3, width=16))
    for e, r in zip(res["epochs"], ref["epochs"]):
        assert e["loss"] == pytest.approx(r["loss"], rel=1e-9)
        assert e["test_accuracy"] == r["test_accuracy"]
