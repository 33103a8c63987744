"""The clock-count model of pipeline schedules (mtcoll.train.pipeline); serial, no MPI."""

from __future__ import annotations

import itertools
import json

import numpy as np
import pytest

from mtcoll.train import pipeline as sm


def _flat_profile(layers, ew=0.0):
    """Every layer F = B = W = 1 (the first layer's B too): perfectly balanceable."""
    one = np.ones(layers)
    return sm.Profile("flat", tuple(f"l{i}" for i in range(layers)), one, one.copy(),
                      one.copy(), np.full(layers, ew), "unit")


def test_vgg16_layers_come_from_the_architecture():
    layers = sm.vgg16_layers()
    names = [n for n, _, _ in layers]
    assert sum(n.startswith("conv") for n in names) == 13
    assert names[-3:] == ["fc6", "fc7", "fc8"]
    macs = dict((n, m) for n, m, _ in layers)
    assert macs["conv1_1"] == 224 * 224 * 64 * 3 * 9
    assert macs["conv1_2"] == 224 * 224 * 64 * 64 * 9
    assert macs["conv5_3"] == 14 * 14 * 512 * 512 * 9
    assert macs["fc6"] == 7 * 7 * 512 * 4096
    # VGG-16's well-known cost: about 15.5 G multiply-accumulates per 224x224 image
    assert 15.3e9 < sum(macs.values()) < 15.6e9
    # the element-wise backward of fc6 runs over conv5_3's output before pooling
    assert dict((n, e) for n, _, e in layers)["fc6"] == 14 * 14 * 512


def _brute_partition(cost, stages):
    n = len(cost)
    best = None
    for cuts in itertools.combinations(range(1, n), stages - 1):
        bounds = (0,) + cuts + (n,)
        v = max(sum(cost[a:b]) for a, b in zip(bounds[:-1], bounds[1:]))
        best = v if best is None else min(best, v)
    return best


@pytest.mark.parametrize("seed", range(5))
def test_partition_is_optimal(seed):
    rng = np.random.default_rng(seed)
    cost = rng.integers(1, 20, size=9).astype(float)
    for stages in (1, 2, 3, 5, 9):
        starts = sm.partition_layers(cost, stages)
        assert starts[0] == 0 and len(starts) == stages and list(starts) == sorted(set(starts))
        bounds = list(starts) + [len(cost)]
        got = max(cost[a:b].sum() for a, b in zip(bounds[:-1], bounds[1:]))
        assert got == _brute_partition(list(cost), stages)


def test_balanced_pipedream_reaches_the_bound():
    p = _flat_profile(12)
    r = sm.run_schedule(p, "pipedream", 4)
    assert r["makespan"] == pytest.approx(9.0)         # 3 tasks x 3 layers per stage
    assert r["bubble"] == pytest.approx(0.0, abs=1e-9)


@pytest.mark.parametrize("m", [1, 4, 8])
def test_gpipe_bubble_matches_the_formula(m):
    # GPipe's bubble fraction (S-1)/(M+S-1) on balanced stages
    p = _flat_profile(8)
    S = 4
    r = sm.run_schedule(p, "gpipe", S, micro_batches=m)
    assert r["bubble"] == pytest.approx((S - 1) / (m + S - 1))
    assert r["makespan"] == pytest.approx((m + S - 1) * 6.0 / m)


def test_layerpipe_placement_never_loses_to_pipedream_and_conserves_work():
    rng = np.random.default_rng(3)
    for _ in range(5):
        n = 10
        f = rng.uniform(1, 10, n)
        ew = rng.uniform(0, 0.5, n)
        ew[0] = 0
        b = f.copy()
        b[0] = 0
        p = sm.Profile("rand", tuple(map(str, range(n))), f, b, f.copy(), ew, "unit")
        for S in (2, 3, 5):
            lp = sm.run_schedule(p, "layerpipe", S)
            pd = sm.run_schedule(p, "pipedream", S)
            assert sum(lp["stage_loads"]) == pytest.approx(p.total)
            assert lp["max_stage_load"] <= pd["max_stage_load"] + 1e-9
            # the steady state cannot beat the busiest processor; the period is measured over
            # a finite window of mini-batches, whose ends may differ by less than a period
            for r in (lp, pd):
                window = r["window"]
                assert r["makespan"] >= r["max_stage_load"] * (1 - 1.0 / window)


def test_list_schedule_respects_dependencies_and_processors():
    p = sm.profile_uniform(6)
    g = sm._Graph()
    stage = sm.stage_of_layers(sm.partition_layers(p.f + p.b + p.w, 3), 6)
    sent = []
    for k in range(4):
        entry = [sent[k - 3]] if k >= 3 else []
        sent.append(sm._add_batch(g, k, p, stage, stage, stage, True, 1.0, sm._PF, entry)[0])
    finish = sm.list_schedule(g, 3)
    start = [f - d for f, d in zip(finish, g.dur)]
    for t, deps in enumerate(g.deps):
        for d in deps:
            assert finish[d] <= start[t] + 1e-12
    for q in range(3):
        spans = sorted((start[t], finish[t]) for t in range(len(g.proc)) if g.proc[t] == q)
        for (a0, a1), (b0, _) in zip(spans, spans[1:]):
            assert a1 <= b0 + 1e-12


def test_vgg16_layerpipe_beats_pipedream_by_the_papers_average():
    # The paper: 25% faster than PipeDream on average over 7-9 processors. Our honest model
    # (docs/training.md) gives more; this checks the model still shows at least the paper's gain.
    results, summary = sm.compare(sm.profile_vgg16(), [7, 8, 9])
    assert summary["average_speedup"] >= 1.25
    for r in results:
        assert 0 < r["utilization"] <= 1 + 1e-9
        assert r["bubble"] == pytest.approx(1 - r["utilization"])


def test_cli_json(tmp_path, capsys):
    out = tmp_path / "s.json"
    sm.main(["--stages", "2,4", "--profile", "uniform:8", "--json", str(out)])
    obj = json.loads(out.read_text())
    assert {(r["schedule"], r["stages"]) for r in obj["results"]} == \
        {(s, S) for s in sm.SCHEDULES for S in (2, 4)}
    for r in obj["results"]:
        assert {"schedule", "stages", "makespan", "utilization", "bubble"} <= set(r)
    assert "layerpipe" in capsys.readouterr().out
    sm.main(["--stages", "3", "--profile", "uniform:6", "--json"])
    obj = json.loads(capsys.readouterr().out)
    assert len(obj["results"]) == 4


def test_measured_profile_runs():
    p = sm.profile_measured(depth=2, width=16, batch=8, repeat=2)
    assert p.layers == 3 and (p.f > 0).all() and p.b[0] == 0
    r = sm.run_schedule(p, "layerpipe", 2)
    assert r["makespan"] > 0


def test_bad_input():
    with pytest.raises(ValueError):
        sm.get_profile("resnet")
    with pytest.raises(ValueError):
        sm.partition_layers([1, 2], 3)
    with pytest.raises(ValueError):
        sm.run_schedule(sm.profile_uniform(4), "zb", 2)


def test_table_names_its_units(capsys):
    sm.main(["--stages", "2", "--profile", "uniform:4"])
    out = capsys.readouterr().out
    assert "makespan[unit]" in out and "bound[unit]" in out
    sm.main(["--stages", "4", "--schedules", "pipedream"])
    out = capsys.readouterr().out
    assert "makespan[MAC]" in out and "multiply-accumulates per mini-batch" in out
