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

from mtcoll.train import _mlp
from mtcoll.train import pipeline as sm
from mtcoll.train._executor import Placement, RealCompute, message_list
from mtcoll.train._trainer import Config, run, run_sequential

ROOT = Path(__file__).resolve().parents[2]


#: layerpipe on 2 stages of partition [0, 2] with every kind of move at the one boundary:
#: W of layer 1 down to stage 1, W of layer 2 up to stage 0, Bew of layer 2 up to stage 0
MOVES = ([0, 1, 0, 1, 1], [0, 0, 0, 1, 1])


def test_moves_are_checked():
    p = sm.profile_uniform(5)
    rec = sm.run_schedule(p, "layerpipe", 2, starts=[0, 2], moves=MOVES)
    assert rec["w_moved"] == ["layer2", "layer3"] and rec["bew_moved"] == ["layer3"]
    with pytest.raises(ValueError, match="layer 1"):
        sm.run_schedule(p, "layerpipe", 2, starts=[0, 2], moves=([0, 0, 1, 1, 1], [0, 1, 0, 1, 1]))
    with pytest.raises(ValueError, match="no moves"):
        sm.run_schedule(p, "pipedream", 2, moves=MOVES)


def test_stashed_weights_are_the_forwards():
    """Weight stashing: a backward reads the version its forward used, not a newer one."""
    params = _mlp.init_params([6, 8, 7, 3], 1)
    rng = np.random.default_rng(1)
    x, y = rng.standard_normal((4, 6)), rng.integers(0, 3, 4)
    c = RealCompute(dict(enumerate(params)), "relu", 3, lambda k: (x, y), 4, 0.5, 0.0,
                    split=True)
    c.forward(0, 1, x @ params[0][0], 0)
    c.update(1, np.ones(c.grad_size(1)), 0)          # version 1 of layer 1 exists now
    c.forward(1, 1, x @ params[0][0], 1)
    delta = rng.standard_normal((4, 7))
    np.testing.assert_array_equal(c.bmm(0, 1, delta), delta @ params[1][0].T)
    assert not np.allclose(c.bmm(1, 1, delta), delta @ params[1][0].T)


def test_delayed_reference_differs_from_sgd():
    """The asynchronous schedules' reference is not plain SGD (the delay is real), and a delay
    of 1 is plain SGD exactly."""
    cfg = _tiny("sequential", 1, 1)
    sgd = run_sequential(cfg, steps=6)
    one = run_sequential(cfg, steps=6, delay=1)
    two = run_sequential(cfg, steps=6, delay=2)
    for (w, _), (w1, _) in zip(sgd["params"], one["params"]):
        np.testing.assert_array_equal(w, w1)
    assert not np.allclose(sgd["params"][0][0], two["params"][0][0])


def test_one_extra_message_per_moved_w():
    """For the model's vgg16 placements: the stage that runs a moved W receives one value it
    would not otherwise (d_l when W_l moved up, a_(l-1) when it moved down) -- two when W_l
    moved down across the boundary where Bew_(l+1) moved up, since d_l is then made upstream
    -- and sends the gradient back to the owner; no other message changes."""
    p = sm.profile_vgg16()
    for S in (4, 7, 8):
        stage_f, stage_w, stage_ew, _ = sm.layerpipe_placement(p, S)
        moved = Placement(stage_f, stage_w, stage_ew, True)
        kept = Placement(stage_f, stage_f, stage_ew, True)
        w_moved = [l for l in range(p.layers) if moved.w[l] != moved.f[l]]
        assert w_moved
        extra = message_list(moved) - message_list(kept)
        assert not message_list(kept) - message_list(moved)
        assert {m for m in extra if m[0] == "gw"} == \
            {("gw", l, moved.w[l], moved.f[l]) for l in w_moved}
        want = set()
        for l in w_moved:
            if moved.w[l] < moved.f[l]:
                want.add(("d", l, moved.producer("d", l), moved.w[l]))
            else:
                if l > 0:                               # the input is on every rank
                    want.add(("a", l - 1, moved.f[l - 1], moved.w[l]))
                if moved.ew[l + 1] != moved.w[l]:
                    want.add(("d", l, moved.ew[l + 1], moved.w[l]))
        assert {m for m in extra if m[0] != "gw"} == want


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
@pytest.mark.parametrize("schedule,dp", [("gpipe", "mtcoll"), ("1f1b", "mtcoll"),
                                         ("gpipe", "mpi4py")])
def test_synchronous_schedules_match_sequential(schedule, dp):
    """With the gradient allreduce on an mtcoll.Comm, or on plain mpi4py (``--comm mpi4py``,
    the reference for the exchange's time)."""
    comm, S, R = _sub(2)
    if comm == MPI.COMM_NULL:
        return
    try:
        cfg = _tiny(schedule, S, R, partition=[0, 3], comm=dp)
        steps = 5
        res = run(cfg, comm, steps=steps)
        if comm.Get_rank() == 0:
            ref = run_sequential(_tiny("sequential", 1, 1), steps=steps)
            for (w, b), (rw, rb) in zip(res["params"], ref["params"]):
                np.testing.assert_allclose(w, rw, rtol=1e-9, atol=1e-12)
                np.testing.assert_allclose(b, rb, rtol=1e-9, atol=1e-12)
            # and the weights did move: the comparison is not between two initial states
            init = _mlp.init_params([32, 16, 16, 16, 10], 0)
            assert not np.allclose(res["params"][0][0], init[0][0])
    finally:
        comm.Free()


@pytest.mark.mpi(min_size=2)
def test_layerpipe_computes_what_pipedream_computes():
    """Same weight versions (delay S) and stashing: moving W and Bew only moves work, so
    pipedream and layerpipe (with every kind of move) both give the delayed reference's
    weights, which are not plain SGD's."""
    comm, S, R = _sub(2)
    if comm == MPI.COMM_NULL:
        return
    try:
        out = {}
        for s in ("pipedream", "layerpipe"):
            out[s] = run(_tiny(s, S, R, depth=4, partition=[0, 2],
                               moves=MOVES if s == "layerpipe" else None), comm, steps=20)
        if comm.Get_rank() == 0:
            assert out["layerpipe"]["placement"]["stage_w"] == MOVES[0]
            assert out["layerpipe"]["placement"]["stage_bew"] == MOVES[1]
            ref = run_sequential(_tiny("sequential", 1, 1, depth=4), steps=20, delay=S)
            for s in ("pipedream", "layerpipe"):
                assert len(out[s]["params"]) == len(ref["params"])
                for (w, b), (rw, rb) in zip(out[s]["params"], ref["params"]):
                    np.testing.assert_allclose(w, rw, rtol=1e-9, atol=1e-12)
                    np.testing.assert_allclose(b, rb, rtol=1e-9, atol=1e-12)
            sgd = run_sequential(_tiny("sequential", 1, 1, depth=4), steps=20)
            assert not np.allclose(out["pipedream"]["params"][0][0], sgd["params"][0][0])
            # the run reports its steady-state throughput beside the model's
            t = out["layerpipe"]["epochs"][-1]["throughput"]
            assert t["mini_batches_per_s"] > 0 and t["model_mini_batches_per_s"] > 0
            assert t["allreduce_seconds_per_batch"] >= 0 and t["wait_seconds_per_batch"] > 0
            assert len(t["stage_busy"]) == S
    finally:
        comm.Free()


def test_config_rejects_bad_layouts():
    with pytest.raises(ValueError):
        Config(schedule="sequential", stages=2).check()
    with pytest.raises(ValueError):
        Config(schedule="gpipe", batch=30, replicas=2, micro_batches=4).check()
    with pytest.raises(ValueError):
        Config(schedule="zb").check()
    with pytest.raises(ValueError, match="cannot fill --stages 9"):
        Config(stages=9, depth=4).check()
    with pytest.raises(ValueError, match="--partition 0,3,2"):
        Config(stages=3, partition=[0, 3, 2]).check()
    with pytest.raises(ValueError, match="--partition 0,2"):
        Config(stages=3, partition=[0, 2]).check()
    with pytest.raises(ValueError, match="--micro-batches 65"):
        Config(schedule="gpipe", micro_batches=65).check()
    with pytest.raises(ValueError, match="--compute"):
        Config(compute="gpu").check()
    with pytest.raises(ValueError, match="--comm 'nccl'"):
        Config(comm="nccl").check()
    with pytest.raises(ValueError, match="uniform:4 has 4 layers"):
        Config(compute="emulate", profile="uniform:4", stages=5).check()
    Config(compute="emulate", profile="vgg16", stages=16).check()


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


def _cli(n, args, timeout=120):
    return _mpirun.run(n, ["-m", "mpi4py", "-m", "mtcoll.train", *args], timeout)


def test_cli_refuses_layouts_that_do_not_fit_once_and_cleanly():
    """A layout that leaves a rank idle, or needs more ranks than launched, is refused before
    anything is printed: one error line from rank 0, exit status 2 on every rank, no hang."""
    for n, args, need in ((4, ["--stages", "3"], "3 stages x 1 replica need 3 processes; "
                                                  "launched 4"),
                          (3, ["--stages", "2", "--replicas", "2"],
                           "2 stages x 2 replicas need 4 processes; launched 3")):
        out = _cli(n, [*args, "--data", "teacher"])
        assert out.returncode == 2, out.stdout + out.stderr
        assert out.stdout == ""
        lines = [s for s in out.stderr.splitlines() if s.strip()]
        assert lines == [f"python -m mtcoll.train: error: {need} "
                         f"({'launch 4' if n == 3 else 'launch a multiple of 3'}, "
                         "or change --stages/--replicas)"], out.stderr


def test_cli_banner_counts_in_the_singular():
    out = _cli(2, ["--stages", "2", "--data", "teacher", "--epochs", "1", "--depth", "2",
                   "--width", "8", "--schedule", "pipedream"])
    assert out.returncode == 0, out.stdout + out.stderr
    assert "2 stages x 1 replica," in out.stderr
    assert "mb/s" in out.stdout.splitlines()[0]


def test_emulated_four_stages_report_the_measured_ratio():
    """4 stages of vgg16, emulated (each task asleep for its modelled time): every run reports
    its steady-state mini-batches/s beside the model's, and layerpipe over pipedream measured
    beside the model's ratio."""
    res = _launch(4, ["--stages", "4", "--compute", "emulate", "--profile", "vgg16",
                      "--schedule", "pipedream,layerpipe", "--batches", "12",
                      "--seconds", "5e-12"], timeout=120)
    assert [r["config"]["schedule"] for r in res["runs"]] == ["pipedream", "layerpipe"]
    for r in res["runs"]:
        t = r["epochs"][0]["throughput"]
        assert t["mini_batches"] == 12 and t["window"] == [3, 9]
        assert t["mini_batches_per_s"] > 0 and t["model_mini_batches_per_s"] > 0
        assert t["measured_over_model"] == pytest.approx(
            t["mini_batches_per_s"] / t["model_mini_batches_per_s"])
        assert len(t["stage_busy"]) == 4 and 0 <= t["bubble"] < 1
    lp = res["runs"][1]
    assert lp["placement"]["w_moved"]            # the model's moves ran
    v = res["vs_pipedream"]["layerpipe"]
    assert v["model"] > 1.2 and v["measured"] > 0
    assert v["measured_over_model"] == pytest.approx(v["measured"] / v["model"])


def test_emulated_replicas_and_synchronous_schedules_run():
    """Emulation with 2 replicas (the allreduce of the profile's gradient sizes) and the
    synchronous schedules' repeated task lists: every run completes and reports its rate."""
    res = _launch(4, ["--stages", "2", "--replicas", "2", "--compute", "emulate", "--profile",
                      "uniform:4", "--schedule", "gpipe,1f1b,layerpipe", "--batches", "6",
                      "--seconds", "2e-3", "--elements", "0.5"], timeout=120)
    assert [r["config"]["schedule"] for r in res["runs"]] == ["gpipe", "1f1b", "layerpipe"]
    for r in res["runs"]:
        t = r["epochs"][0]["throughput"]
        assert t["mini_batches"] == 6 and t["mini_batches_per_s"] > 0
        assert r["config"]["micro_batches"] is None and r["model"]["stages"] == 2
    assert res["vs_pipedream"] is None           # no pipedream run to compare with
