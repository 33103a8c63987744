"""The calibrated ``auto`` (mtcoll._calibrate): the model, the probe, its cache and its key.

Serial tests check the model on made-up measurements; the MPI tests probe for real, when
asked (:func:`mtcoll._calibrate.calibrate`: a Comm itself never probes; small sizes, no time
budget beyond the minimum points, so that they stay cheap) and check what holds whatever the
timings: every rank gets the same calibration and choices, a new Comm reads the cache as its
prior, a changed key probes again, a tuning table overrides, a cache directory that cannot be
written costs nothing but the cache, and every choice gives the right sum. No test depends on
which algorithm is faster.
"""

from __future__ import annotations

import json
import os
import tempfile

import numpy as np
import pytest
from mpi4py import MPI

import mtcoll
import mtcoll.plan
from mtcoll import _calibrate
from mtcoll._calibrate import Calibration

SIZES = [8, 1024, 4096, 16384, 65536, 1 << 20, 64 << 20]


def _data(measured, native_links=(0.0, 0.0)):
    feats = {"native": {"native": True, "links": list(native_links)},
             "rhd": {"steps": 4, "fractions": [0.5, 0.5, 0.25, 0.25] * 2, "bytes": 3.0,
                     "links": [0.0, 0.0], "segmenting": [1 << 18, 16], "transfers": 32},
             "multitree": {"steps": 6, "fractions": [0.125] * 24, "bytes": 3.0,
                           "links": [0.0, 0.0], "segmenting": [1 << 18, 16], "transfers": 96}}
    return {"key": {}, "features": feats, "measured": measured, "probe_seconds": 0.1,
            "created": "now"}


def test_prediction_reproduces_the_probe_and_the_choice_follows_it():
    meas = {"native": [[16384, 0.010], [4 << 20, 0.100]],
            "rhd": [[16384, 0.020], [4 << 20, 0.050]],
            "multitree": [[4 << 20, 0.080]]}
    cal = Calibration(_data(meas))
    for a, pts in meas.items():
        for b, t in pts:
            assert cal.predict(b)[a] == pytest.approx(t, rel=1e-9)
    assert cal.choose(16384)[0] == "native"
    assert cal.choose(4 << 20)[0] == "rhd"
    why = cal.choose(4 << 20)[1]
    assert why.startswith("calibrated: rhd 50ms") and "native 100ms" in why \
        and "multitree 80ms" in why
    # every candidate's prediction is positive and finite at every size
    for b in SIZES:
        assert all(0 < t < 1e3 for t in cal.predict(b).values())


def test_a_point_measured_twice_keeps_its_faster_time():
    cal = Calibration(_data({"native": [[4096, 0.3], [4096, 0.1]], "rhd": [[4096, 0.2]]}))
    assert cal.predict(4096)["native"] == pytest.approx(0.1)
    assert cal.choose(4096)[0] == "native"


def test_the_library_wins_within_the_margin():
    near = 1 + _calibrate.MARGIN / 2
    cal = Calibration(_data({"native": [[4096, 0.1 * near]], "rhd": [[4096, 0.1]]}))
    assert cal.choose(4096)[0] == "native"
    cal = Calibration(_data({"native": [[4096, 0.2]], "rhd": [[4096, 0.1]]}))
    assert cal.choose(4096)[0] == "rhd"


def test_below_the_probes_reach_the_library():
    # rhd measured 3x faster than the library at 16 KiB: it may take calls down to 16 KiB /
    # REACH, never the tiny ones below, which are latency (the model cannot rank them)
    cal = Calibration(_data({"native": [[16384, 0.3]], "rhd": [[16384, 0.1]]}))
    assert cal.choose(16384)[0] == "rhd"
    assert cal.choose(16384 // _calibrate.REACH)[0] == "rhd"
    for b in (8, 64, 16384 // _calibrate.REACH - 1):
        assert cal.choose(b)[0] == "native", b


def test_an_unmeasured_algorithm_takes_the_measured_ones_correction():
    # the model (fitted to rhd alone) is right for rhd by construction; multitree unmeasured
    meas = {"native": [[4096, 1.0]], "rhd": [[4096, 0.3], [1 << 20, 0.6]]}
    cal = Calibration(_data(meas))
    p = cal.predict(1 << 20)
    assert p["multitree"] == pytest.approx(cal.model("multitree", 1 << 20) * p["rhd"]
                                           / cal.model("rhd", 1 << 20), rel=1e-9)
    share = cal.message_share("multitree", 4096)
    assert share is not None and 0 <= share <= 1
    assert cal.message_share("native", 4096) is None


def test_the_key_names_everything_that_invalidates(monkeypatch, tmp_path):
    monkeypatch.setenv("MTCOLL_CACHE_DIR", str(tmp_path))
    base = _calibrate.key(4, [4], "torus:2x2", "sleep", (1 << 20, 4))
    path = _calibrate.cache_path(base)
    assert path.parent == tmp_path and path.name.startswith("calibration-4r-")
    for k in ({**base, "nranks": 8}, {**base, "hosts": [2, 2]}, {**base, "mpi_library": "x"},
              {**base, "engine": "faster"}, {**base, "mtcoll": "9"}, {**base, "network": "ring:4"}):
        assert _calibrate.cache_path(k) != path
    assert base["engine"] == _calibrate.engine_id() and len(base["engine"]) == 16
    assert base["mpi_library"].split()[0] in ("MPICH", "Open", "Intel")


def test_cache_dir_and_mode_from_the_environment(monkeypatch, tmp_path):
    monkeypatch.delenv("MTCOLL_CACHE_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert _calibrate.cache_dir() == tmp_path / "mtcoll"
    monkeypatch.setenv("MTCOLL_CACHE_DIR", str(tmp_path / "x"))
    assert _calibrate.cache_dir() == tmp_path / "x"
    for raw, want in (("", "on"), ("on", "on"), ("off", "off"), ("0", "off"),
                      ("refresh", "refresh")):
        monkeypatch.setenv("MTCOLL_CALIBRATE", raw)
        assert _calibrate.mode() == want
    monkeypatch.setenv("MTCOLL_CALIBRATE", "sometimes")
    with pytest.raises(ValueError, match="MTCOLL_CALIBRATE"):
        _calibrate.mode()
    assert _calibrate.host_layout([0, 0, 2, 2, 2]) == [2, 3]


# -- under mpiexec --------------------------------------------------------------------------

@pytest.fixture
def probing(comm, monkeypatch):
    """Calibration on, a fresh cache directory shared by all ranks, a cheap probe."""
    d = tempfile.mkdtemp(prefix="mtcoll-cal-") if comm.rank == 0 else None
    d = comm.bcast(d, root=0)
    monkeypatch.setenv("MTCOLL_CALIBRATE", "on")
    monkeypatch.setenv("MTCOLL_CACHE_DIR", d)
    monkeypatch.setenv("MTCOLL_PROBE_SECONDS", "0")
    monkeypatch.setattr(_calibrate._probe, "SMALL", 1024)
    monkeypatch.setattr(_calibrate._probe, "LARGE", 65536)
    monkeypatch.setattr(_calibrate._probe, "REPEATS", 1)
    yield d
    comm.Barrier()


def _same_everywhere(comm, value):
    got = comm.allgather(value)
    assert all(g == got[0] for g in got), got


def _check_sums(c, comm):
    for b in SIZES[:-1]:
        x = np.arange(b // 4, dtype=np.float32) % 7 + comm.rank
        y = np.empty_like(x)
        want = np.empty_like(x)
        c.Allreduce(x, y, MPI.SUM)
        comm.Allreduce(x, want, MPI.SUM)
        assert np.array_equal(y, want), b


@pytest.mark.mpi
def test_probe_then_cache_and_every_rank_chooses_the_same(comm, probing):
    if comm.size < 2:
        pytest.skip("a single rank has nothing to calibrate")
    with mtcoll.Comm(comm) as c:
        assert c.calibration is None  # a cold cache: no probe at construction
        cal = _calibrate.calibrate(c)
        assert cal is not None and cal.source == "probe"
        assert cal.candidates[0] == "native" and "multitree" in cal.candidates
        for a in ("native", "rhd", "multitree"):  # the minimum: each at two sizes
            assert [b for b, _ in cal.data["measured"][a]] == [65536, 1024], a
        choices = [mtcoll.comm.choose(b, comm.size, c.network, calibration=cal) for b in SIZES]
        _same_everywhere(comm, choices)
        _same_everywhere(comm, json.dumps(cal.data, sort_keys=True))
        assert all(a in cal.candidates for a in choices)
        _check_sums(c, comm)
        if comm.rank == 0:
            assert os.path.isfile(cal.path) and os.path.dirname(cal.path) == probing
    with mtcoll.Comm(comm) as c2:
        assert c2.calibration.source == "cache"
        assert c2.calibration.data == cal.data
        _same_everywhere(comm, [c2.calibration.choose(b)[0] for b in SIZES])
        assert [c2.calibration.choose(b)[0] for b in SIZES] == choices


@pytest.mark.mpi
def test_a_changed_key_or_refresh_probes_again(comm, probing, monkeypatch):
    if comm.size < 2:
        pytest.skip("a single rank has nothing to calibrate")
    with mtcoll.Comm(comm) as c:
        first = _calibrate.calibrate(c).data
    monkeypatch.setattr(_calibrate._cache, "engine_id", lambda: "a-faster-engine")
    with mtcoll.Comm(comm) as c:
        assert c.calibration is None  # the new key has no file yet
        cal = _calibrate.calibrate(c)
        assert cal.source == "probe"
        assert cal.data["key"]["engine"] == "a-faster-engine"
        assert cal.data["key"] != first["key"]
    if comm.rank == 0:
        assert len([f for f in os.listdir(probing) if f.endswith(".json")]) == 2
    monkeypatch.setenv("MTCOLL_CALIBRATE", "refresh")
    with mtcoll.Comm(comm) as c:
        assert c.calibration is None  # refresh: the cached prior is not read
        assert _calibrate.calibrate(c).source == "probe"
    monkeypatch.setenv("MTCOLL_CALIBRATE", "on")
    with mtcoll.Comm(comm) as c:
        assert c.calibration.source == "cache"
        assert _calibrate.calibrate(c).source == "cache"
    # a damaged file: probed again and rewritten
    if comm.rank == 0:
        for f in os.listdir(probing):
            with open(os.path.join(probing, f), "w") as fh:
                fh.write("{not json")
    comm.Barrier()
    with mtcoll.Comm(comm) as c:
        assert c.calibration is None  # not readable: no prior
        assert _calibrate.calibrate(c).source == "probe"
        _check_sums(c, comm)


@pytest.mark.mpi
def test_an_unwritable_cache_costs_only_the_cache(comm, probing, monkeypatch):
    if comm.size < 2:
        pytest.skip("a single rank has nothing to calibrate")
    blocker = os.path.join(probing, "a-file")
    if comm.rank == 0:
        open(blocker, "w").close()
    comm.Barrier()
    monkeypatch.setenv("MTCOLL_CACHE_DIR", os.path.join(blocker, "sub"))  # not a directory
    with mtcoll.Comm(comm) as c:
        cal = _calibrate.calibrate(c)
        assert cal.source.startswith("probe (not cached:")
        assert cal.path is None
        _same_everywhere(comm, [cal.choose(b)[0] for b in SIZES])
        _check_sums(c, comm)


@pytest.mark.mpi
def test_a_tuning_table_overrides_and_off_turns_it_off(comm, probing, monkeypatch):
    if comm.size < 2:
        pytest.skip("a single rank has nothing to calibrate")
    spec = mtcoll.topology.auto_spec(comm.size)
    table = os.path.join(probing, "tuning.json")
    if comm.rank == 0:
        with open(table, "w") as fh:
            json.dump({"mtcoll_tuning": 1, "tables": [
                {"nranks": comm.size, "topology": spec,
                 "rules": [{"max_bytes": 4096, "algorithm": "native"},
                           {"max_bytes": None, "algorithm": "ring"}]}]}, fh)
    comm.Barrier()
    monkeypatch.setenv("MTCOLL_TUNING", table)
    with mtcoll.Comm(comm) as c:
        assert c.calibration is None and c.tuning
        assert mtcoll.comm.choose(1 << 20, comm.size, c.network, tuning=c.tuning) == "ring"
    if comm.rank == 0:
        assert not [f for f in os.listdir(probing) if f.startswith("calibration-")]
    monkeypatch.setenv("MTCOLL_TUNING", "off")
    monkeypatch.setenv("MTCOLL_CALIBRATE", "off")
    with mtcoll.Comm(comm) as c:
        assert c.calibration is None
        assert mtcoll.comm.choose(1 << 20, comm.size, c.network) == "multitree"
    with mtcoll.Comm(comm, algorithm="ring") as c:
        assert c.calibration is None


@pytest.mark.mpi
def test_debug_prints_every_candidates_prediction(comm, probing, monkeypatch, capfd):
    if comm.size < 2:
        pytest.skip("a single rank has nothing to calibrate")
    monkeypatch.setenv("MTCOLL_DEBUG", "1")
    with mtcoll.Comm(comm) as c:
        _calibrate.calibrate(c, debug=True)
    with mtcoll.Comm(comm) as c:  # the probe's file is this one's prior
        x = np.ones(1 << 16, np.float32)
        c.Allreduce(x, np.empty_like(x), MPI.SUM)
        cands = c.calibration.candidates
    err = capfd.readouterr().err
    if comm.rank == 0:
        assert "calibration source probe" in err and "calibration measured native" in err
        assert "auto prior from cache" in err
        lines = [ln for ln in err.splitlines() if "bytes=262144" in ln]
        assert len(lines) == 1 and "chosen by auto, " in lines[0]
        for a in cands:  # the prior's prediction of every candidate
            assert f"{a} " in lines[0].split("(prior: ")[1]
        # the probe's own calls print nothing
        assert not [ln for ln in err.splitlines() if "bytes=1024 " in ln]
    else:
        assert "mtcoll[rank 0]" not in err


def test_a_candidate_measured_only_far_away_is_not_chosen():
    # multitree measured at 4 MiB alone: whatever the model says at 1 KiB, not chosen there
    meas = {"native": [[16384, 0.05], [4 << 20, 0.10]], "rhd": [[16384, 0.06], [4 << 20, 0.2]],
            "multitree": [[4 << 20, 0.01]]}
    cal = Calibration(_data(meas))
    assert cal.predict(1024)["multitree"] < cal.predict(1024)["native"]
    algo, why = cal.choose(1024)
    assert algo == "native" and "multitree" in why and "not measured near this size" in why
    assert cal.choose(4 << 20)[0] == "multitree" and cal.choose(64 << 20)[0] == "multitree"


@pytest.mark.mpi
def test_a_bad_calibrate_value_raises_on_every_rank(comm, probing, monkeypatch):
    if comm.size < 2:
        pytest.skip("a single rank has nothing to calibrate")
    monkeypatch.setenv("MTCOLL_CALIBRATE", "sometimes")
    with pytest.raises(ValueError, match="MTCOLL_CALIBRATE"):
        mtcoll.Comm(comm)
    monkeypatch.setenv("MTCOLL_CALIBRATE", "on")
    with mtcoll.Comm(comm) as c:  # and nothing was left half-made
        _check_sums(c, comm)


@pytest.mark.mpi
def test_the_probe_times_the_algorithm_it_names(comm, monkeypatch):
    """Each probe point runs the candidate it is for: a candidate timed after the library at a
    size must not go down the fast path the library's calls opened (it did: every candidate
    measured at the library's time, and auto sent small calls to schedules 10x slower)."""
    if comm.size < 2:
        pytest.skip("a single rank has nothing to calibrate")
    monkeypatch.setenv("MTCOLL_CALIBRATE", "off")
    monkeypatch.setenv("MTCOLL_CHECK", "0")  # (the tests' default is on: no fast path)
    with mtcoll.Comm(comm, algorithm="native") as c:
        ran = []
        library = c._lib_allreduce

        def spy(*args):
            ran.append(c.algorithm)
            return library(*args)

        c._lib_allreduce = spy
        times = _calibrate.time_batch(c, ["native", "ring", "native", "ring"], 16384,
                                       repeats=2)
        assert set(times) == {"native", "ring"} and all(t > 0 for t in times.values())
        assert "native" in ran and "ring" not in ran, ran
        _same_everywhere(comm, sorted(times))


# -- the probe and the model on a made-up machine (a fake clock, no MPI) ---------------------

class _FakeDup:
    def __init__(self, clock):
        self.clock = clock

    def Get_rank(self):
        return 0

    def Get_size(self):
        return 1

    def Barrier(self):
        self.clock[0] += 1e-5

    def Allreduce(self, send, recv, op):
        recv[...] = send

    def bcast(self, obj, root=0):
        return obj

    def allreduce(self, obj, op=None):
        return obj


class _FakeExecutor:
    def layout(self, *args):
        pass


class _FakeComm:
    """One rank of a made-up machine: ``Allreduce`` advances the fake clock by what ``cost``
    says the forced algorithm takes at that size, and records the call."""

    def __init__(self, cost, spec="torus:4x4", nranks=16):
        self.clock = [0.0]
        self.cost = cost
        self.calls = []
        self.algorithm = "auto"
        self.network = mtcoll.topology.parse(spec)
        self._size = nranks
        self._dup = _FakeDup(self.clock)
        self.wait, self.segment_bytes, self.max_segments = "busy", None, None
        self._schedules = {}
        # what mtcoll.comm._planning.executor finds: executors whose layouts cost nothing
        self._executors = {a: _FakeExecutor() for a in mtcoll.plan.ALGORITHMS}

    def schedule(self, a):
        if a not in self._schedules:
            self._schedules[a] = mtcoll.plan.plan(self.network, a)
        return self._schedules[a]

    def Allreduce(self, send, recv, op):
        self.calls.append((self.algorithm, send.nbytes))
        self.clock[0] += self.cost(self.algorithm, send.nbytes)


def _fake_probe(monkeypatch, cost, nranks=16, spec="torus:4x4"):
    comm = _FakeComm(cost, spec, nranks)
    monkeypatch.setattr(_calibrate._probe.time, "perf_counter", lambda: comm.clock[0])
    monkeypatch.setattr(_calibrate._probe, "_warm_engine", lambda: None)
    data = _calibrate._probe.run(comm, {"fake": True})
    return comm, Calibration(data)


def _testbed_cost(a, n):
    # torus:4x4 at 20 Mbit/s as measured (docs/performance.md, "auto on the emulated cluster"):
    # MultiTree 0.376 s at 1 MiB and 1.29 s at 4 MiB, the library 1.17 s and 4.99 s; every call a
    # fixed cost plus bytes
    fixed, per_mib = {"native": (0.03, 1.24), "multitree": (0.07, 0.305), "rhd": (0.04, 2.0),
                      "dbtree": (0.05, 1.5), "ring2d": (0.06, 0.42), "ring": (0.1, 1.0),
                      "timed": (0.08, 0.32)}[a]
    return fixed + per_mib * n / 2**20


def test_the_probe_on_links_gets_multitree_right_at_1_and_4_mib(monkeypatch):
    """On the emulated cluster a probe that measured MultiTree at 4 MiB alone picked it at
    4 MiB but the library at 1 MiB, where MultiTree was 3.1x faster; each candidate is measured
    at two sizes and predicted from its own points."""
    comm, cal = _fake_probe(monkeypatch, _testbed_cost)
    small, _, large = _calibrate.probe_sizes(16)
    for a in ("native", "rhd", "multitree"):
        assert sorted(b for b, _ in cal.data["measured"][a]) == [small, large], a
    for n in (1 << 20, 4 << 20, 16 << 20):
        pred = cal.predict(n)
        for a in ("native", "multitree"):
            assert pred[a] == pytest.approx(_testbed_cost(a, n), rel=0.02), (a, n)
        assert cal.choose(n)[0] == "multitree", n
    assert cal.choose(1024)[0] == "native"
    # dominated candidates were not timed three times: the library at the large size (4x
    # MultiTree), rhd there too; so the probe costs less than every point in full
    timed = [c for c in comm.calls if c == ("native", large)]
    assert len(timed) == 1 + 2, comm.calls
    full = sum(4 * _testbed_cost(a, b) for b, names in _calibrate.probe_batches(16)[:2]
               for a in names)
    assert cal.data["probe_seconds"] < 0.8 * full


def _shared_memory_cost(a, n):
    # 8 ranks on 2 cores, roughly as measured here: the library wins below 4 MiB, ring is a
    # little behind it at 4 MiB; MultiTree's messages cost it at every size
    fixed, per_mib = {"native": (1e-4, 2.4e-3), "rhd": (6e-4, 3.0e-3), "multitree": (2e-3, 3.3e-3),
                      "dbtree": (1e-3, 4e-3), "ring2d": (1.5e-3, 3e-3), "ring": (1.5e-3, 2.6e-3),
                      "timed": (2.5e-3, 3.4e-3)}[a]
    return fixed + per_mib * n / 2**20


def test_the_probe_on_shared_memory_keeps_the_library(monkeypatch):
    comm, cal = _fake_probe(monkeypatch, _shared_memory_cost, nranks=8, spec="torus:2x4")
    for n in SIZES:
        assert cal.choose(n)[0] == "native", (n, cal.choose(n))
    # the budget was spent on more points than the minimum (the made-up calls are cheap)
    assert sum(len(v) for v in cal.data["measured"].values()) > 6


def test_the_minimum_is_measured_whatever_the_budget(monkeypatch):
    monkeypatch.setenv("MTCOLL_PROBE_SECONDS", "0")
    comm, cal = _fake_probe(monkeypatch, _testbed_cost)
    assert sorted(cal.data["measured"]) == ["multitree", "native", "rhd"]
    assert all(len(v) == 2 for v in cal.data["measured"].values())


def test_dominated_and_probe_sizes():
    assert _calibrate.dominated({"a": [1.0, 1.1], "b": [2.3, 2.4], "c": [1.5, 2.5]}) == {"b"}
    # one fast call is enough to stay (noise can slow a call, not speed it up)
    assert _calibrate.dominated({"a": [1.0, 1.0], "b": [2.1, 30.0]}) == {"b"}
    assert _calibrate.dominated({"a": [1.0, 1.0], "b": [1.9, 30.0]}) == set()
    assert _calibrate.dominated({"a": [1.0]}) == set()
    assert _calibrate.probe_sizes(8) == (16384, 262144, 4 << 20)
    assert _calibrate.probe_sizes(16)[2] == 4 << 20
    assert _calibrate.probe_sizes(64)[2] == 4 << 20
    assert _calibrate.probe_sizes(128)[2] == 2 << 20
    assert _calibrate.probe_sizes(100000)[2] == 16 * 16384  # never below


def test_between_and_beyond_two_points_the_candidates_own_line():
    meas = {"native": [[16384, 0.001], [4 << 20, 0.101]],
            "rhd": [[16384, 0.004], [4 << 20, 0.05]]}
    cal = Calibration(_data(meas))
    slope_n = 0.1 / ((4 << 20) - 16384)
    for n in (1 << 20, 16 << 20, 64 << 20):
        assert cal.predict(n)["native"] == pytest.approx(0.001 + slope_n * (n - 16384))
    # below the smallest size the fixed cost never goes negative
    assert 0 < cal.predict(8)["native"] <= 0.001
    assert cal.choose(1 << 20)[0] == "rhd" and cal.choose(16384)[0] == "native"
    assert any("above:" in line for line in cal.describe())
