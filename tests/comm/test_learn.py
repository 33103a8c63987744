"""``auto`` learning on the calls it runs (mtcoll.comm._learn).

The MPI tests inject each call's time through :data:`mtcoll.comm._learn.timing` (per rank, per
algorithm), so what auto learns is decided by the test, not by the machine's load, and run
with the agreement check on (the tests' default, ``MTCOLL_CHECK=1``): a call whose algorithm
differs between ranks raises there. They check that every rank runs the same algorithm for
every call while the ranks' timings differ, that a prior over-predicting the library is
caught, that a settled class whose observed time drifts is measured again, what the cache
records and what ``--info`` shows of it.
"""

from __future__ import annotations

import json
import tempfile

import numpy as np
import pytest
from mpi4py import MPI

import mtcoll
from mtcoll import _calibrate
from mtcoll.comm import _learn
from mtcoll._calibrate import features, host_layout, key, segmenting

N = 4096  # float32 elements: 16 KiB, a class auto learns on without a prior


def test_size_classes_are_powers_of_two():
    assert [_learn.size_class(b) for b in (0, 1, 2, 3, 40, 512, 1280, 401408, 1 << 20)] == \
        [1, 1, 2, 4, 64, 512, 2048, 524288, 1 << 20]
    assert _learn.class_name((512, "float32", "SUM")) == "512B:float32:SUM"


@pytest.fixture
def learning(comm, monkeypatch):
    """Learning on, a fresh cache directory shared by all ranks."""
    if comm.size < 2:
        pytest.skip("a single rank has nothing to learn")
    d = tempfile.mkdtemp(prefix="mtcoll-learn-") if comm.rank == 0 else None
    d = comm.bcast(d, root=0)
    monkeypatch.setenv("MTCOLL_CALIBRATE", "on")
    monkeypatch.setenv("MTCOLL_CACHE_DIR", d)
    yield d
    comm.Barrier()


def _inject(monkeypatch, table):
    """Each call's time: ``table(rank)[algorithm]`` seconds."""
    monkeypatch.setattr(_learn, "timing", lambda rank, algo, nbytes, t: table(rank)[algo])


def _record_choices(monkeypatch):
    ran = []
    choose = _learn.Learner.choose

    def spy(self, c):
        got = choose(self, c)
        ran.append((c.kind, c.nbytes, got[0]))
        return got

    monkeypatch.setattr(_learn.Learner, "choose", spy)
    return ran


def _calls(c, comm, n, count=N):
    """``n`` calls alternating Allreduce and Iallreduce, each checked against the library."""
    for i in range(n):
        x = (np.arange(count, dtype=np.float32) % 5) + comm.rank + i
        want = np.empty_like(x)
        comm.Allreduce(x, want, MPI.SUM)
        if i % 2:
            y = x.copy()
            MPI.Request.Waitall([c.Iallreduce(MPI.IN_PLACE, y, MPI.SUM)])
        else:
            y = np.empty_like(x)
            c.Allreduce(x, y, MPI.SUM)
        assert np.array_equal(y, want), i


def _expected(report, table, size):
    # what the rule gives: per candidate the mean over the ranks, the library within MARGIN
    mean = {a: sum(table(r)[a] for r in range(size)) / size for a in report["candidates"]}
    return min(report["candidates"], key=lambda a: (mean[a] * (1 + _learn.MARGIN)
                                                    if a != "native" else mean[a]))


@pytest.mark.mpi
def test_every_rank_runs_the_same_algorithm_when_their_timings_differ(comm, learning,
                                                                      monkeypatch):
    # rank 0 finds rhd fastest, the others multitree; the library is in between everywhere
    def table(rank):
        if rank == 0:
            return {"native": 1e-3, "rhd": 2e-4, "multitree": 2e-3}
        return {"native": 1e-3 * (1 + rank / 10), "rhd": 6e-4, "multitree": 1e-4}

    _inject(monkeypatch, table)
    ran = _record_choices(monkeypatch)
    with mtcoll.Comm(comm) as c:
        _calls(c, comm, 20)
        rep = c._learner.report()
    name = f"{N * 4}B:float32:SUM"
    assert rep[name]["state"] == "settled" and rep[name]["calls"] == 12
    assert rep[name]["candidates"][0] == "native" and len(rep[name]["candidates"]) >= 2
    assert rep[name]["choice"] == _expected(rep[name], table, comm.size)
    every = comm.allgather(ran)
    assert all(r == every[0] for r in every)
    assert len({a for _, _, a in ran[:12]}) == len(rep[name]["candidates"])  # all were tried
    assert {a for _, _, a in ran[12:]} == {rep[name]["choice"]}


def _plan_candidates(c):
    # collective (the first use of an algorithm plans on rank 0 and broadcasts): every rank,
    # before rank 0 alone writes the file from the schedules
    return {a: c.schedule(a) for a in ("rhd", "multitree")}


def _poisoned_file(c, path, schedules, factor=15.0):
    # a calibration whose library times are `factor` times what the calls take
    seg = segmenting(c)
    k = key(c._size, host_layout(c._leaders), c.network.spec, c.wait, seg)
    feats = {"native": {"native": True, "links": [0.0, 0.0]}}
    measured = {"native": [[1024, 1e-4 * factor], [65536, 1e-3 * factor]]}
    for a, f in (("rhd", 1.5), ("multitree", 1.8)):
        feats[a] = features(schedules[a], c.network, seg)
        measured[a] = [[1024, 1e-4 * f], [65536, 1e-3 * f]]
    data = {"key": k, "features": feats, "measured": measured, "probe_seconds": 0.1,
            "phases": {}, "created": "made by a test",
            "load": {"loadavg": [9.0, 9.0, 9.0], "cpu_share": 0.2}}
    with open(path, "w") as fh:
        json.dump(data, fh)


@pytest.mark.mpi
def test_a_prior_that_overpredicts_the_library_is_caught_on_the_calls(comm, learning,
                                                                      monkeypatch):
    with mtcoll.Comm(comm) as c:
        path = c._learner.path
        assert c.calibration is None and path is not None  # a cold cache: no probe
        schedules = _plan_candidates(c)
        if comm.rank == 0:
            _poisoned_file(c, path, schedules)
        comm.Barrier()
    truth = {"native": 1e-3, "rhd": 1.4e-3, "multitree": 1.6e-3}
    _inject(monkeypatch, lambda rank: truth)
    with mtcoll.Comm(comm) as c:
        assert c.calibration.choose(N * 4)[0] != "native"  # the poisoned prior's pick
        _calls(c, comm, 16)
        rep = c._learner.report()[f"{N * 4}B:float32:SUM"]
    assert rep["choice"] == "native" and "native" in rep["candidates"]
    assert rep["calls"] == 4 * len(rep["candidates"])
    assert rep["predicted"] == pytest.approx(c.calibration.predict(N * 4)["native"])
    assert rep["measured"] == pytest.approx(1e-3)
    comm.Barrier()  # (rank 0 wrote it)
    with open(path) as fh:  # what the next run starts from
        learned = json.load(fh)["learned"][f"{N * 4}B:float32:SUM"]
    assert learned["algorithm"] == "native" and learned["calls"] == rep["calls"]
    assert learned["cpu_share"] > 0 and learned["candidates"]["native"] == pytest.approx(1e-3)
    with mtcoll.Comm(comm) as c:  # the next Comm starts from what was learned
        assert c._learner.learned[f"{N * 4}B:float32:SUM"]["algorithm"] == "native"
        ran = _record_choices(monkeypatch)
        _calls(c, comm, 2)
        assert [a for _, _, a in ran] == ["native", "native"]  # the only candidate now


@pytest.mark.mpi
def test_a_settled_class_is_measured_again_when_its_time_drifts(comm, learning, monkeypatch):
    monkeypatch.setattr(_learn, "SAMPLE", 2)
    monkeypatch.setattr(_learn, "WINDOW", 3)
    now = {"native": 2e-3, "rhd": 1e-3, "multitree": 3e-3}
    _inject(monkeypatch, lambda rank: now)
    ran = _record_choices(monkeypatch)
    name = f"{N * 4}B:float32:SUM"
    with mtcoll.Comm(comm) as c:
        _calls(c, comm, 12)
        rep = c._learner.report()[name]
        assert rep["choice"] == "rhd" and rep["state"] == "settled"
        _calls(c, comm, 6)  # three samples of rhd as measured: no drift
        assert c._learner.report()[name]["relearned"] == 0
        assert c._learner.report()[name]["observed"] == pytest.approx(1e-3)
        now["rhd"] = 1e-3 * _learn.DRIFT * 2  # rhd got slower (a link degraded, say)
        _calls(c, comm, 6)  # three samples: the median is far off: measured again
        rep = c._learner.report()[name]
        assert rep["relearned"] == 1 and rep["state"] == "trial"
        assert rep["observed"] == pytest.approx(now["rhd"])
        _calls(c, comm, 4 * len(rep["candidates"]))
        rep = c._learner.report()[name]
        assert rep["state"] == "settled" and rep["choice"] == "native"
    every = comm.allgather(ran)
    assert all(r == every[0] for r in every)


@pytest.mark.mpi
def test_off_is_the_built_in_rule_and_refresh_ignores_the_prior(comm, learning, monkeypatch):
    _inject(monkeypatch, lambda rank: {"native": 1e-3, "rhd": 2e-3, "multitree": 2e-3})
    with mtcoll.Comm(comm) as c:
        _calls(c, comm, 12)
        path = c._learner.path
    monkeypatch.setenv("MTCOLL_CALIBRATE", "off")
    with mtcoll.Comm(comm) as c:
        assert c._learner is None and c.calibration is None
        _calls(c, comm, 2)
    monkeypatch.setenv("MTCOLL_CALIBRATE", "refresh")
    _inject(monkeypatch, lambda rank: {"native": 3e-3, "rhd": 1e-3, "multitree": 2e-3})
    with mtcoll.Comm(comm) as c:
        assert c._learner.learned == {}  # the file's entry is not read
        _calls(c, comm, 12)
        assert c._learner.report()[f"{N * 4}B:float32:SUM"]["choice"] == "rhd"
    comm.Barrier()  # (rank 0 wrote it)
    with open(path) as fh:  # and rewritten
        assert json.load(fh)["learned"][f"{N * 4}B:float32:SUM"]["algorithm"] == "rhd"


@pytest.mark.mpi
def test_info_shows_each_learned_class(comm, learning, monkeypatch):
    from mtcoll.__main__ import info

    _inject(monkeypatch, lambda rank: {"native": 1e-3, "rhd": 5e-4, "multitree": 2e-3})
    with mtcoll.Comm(comm) as c:
        schedules = _plan_candidates(c)
        if comm.rank == 0:
            _poisoned_file(c, c._learner.path, schedules)
        comm.Barrier()
    with mtcoll.Comm(comm) as c:
        _calls(c, comm, 12)
    facts = info(comm)
    assert facts["auto_prior"].startswith("cache, ") and facts["calibration_source"] == "cache"
    assert facts["calibration_load"] == "load average 9.00 9.00 9.00, ranks' CPU share 20%"
    lines = facts["auto_classes"]
    assert len(lines) == 1 and lines[0].startswith(f"{N * 4}B:float32:SUM: rhd, predicted ")
    assert "observed 0.5 ms, decided by 12 calls" in lines[0]
    assert "native 1 ms" in lines[0] and "ranks' CPU share" in lines[0]


@pytest.mark.mpi
def test_block_calls_without_a_prior_go_to_the_library(comm, learning):
    """Reduce_scatter_block and Allgather are not learned: with no prior auto hands them to
    the MPI library at every size (the built-in rule's MultiTree from 64 KiB can be many times
    slower on shared memory), and their results are the library's."""
    size = comm.Get_size()
    with mtcoll.Comm(comm) as c:
        assert c.calibration is None
        for k in (1, 1 << 14):
            send, recv = np.ones(k * size, np.float32), np.zeros(k * size, np.float32)
            call = c._prepare("Allgather", send[:k], recv, None)
            assert call.algorithm == "native" and "learns Allreduce" in call.why
            call = c._prepare("Reduce_scatter_block", send, recv[:k], MPI.SUM)
            assert call.algorithm == "native"
            c.Allgather(send[:k], recv)
            assert np.all(recv == 1)
            c.Reduce_scatter_block(send, recv[:k], op=MPI.SUM)
            assert np.all(recv[:k] == size)
