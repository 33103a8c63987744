"""MultiTree by translation on 2-D tori: the whole schedule passes the general validator, a
rank's part computed from tree 0 equals its part of the whole, and tree 0's own check catches
what would break its translates."""

from __future__ import annotations

import numpy as np
import pytest

from mtcoll.plan import plan, rank_parts, translate, validate
from mtcoll.schedule import RankSchedule, _stream_summary

TORI = ("torus:3x3", "torus:3x5", "torus:4x4", "torus:5x7", "torus:8x8", "torus:12x12")


@pytest.mark.parametrize("spec", TORI)
def test_translated_schedule_is_valid_and_near_the_general_steps(spec):
    tr = translate(spec)
    assert tr.check() == []
    s = tr.schedule()
    r = validate(s, spec, engine="numba")
    assert r.valid, r.errors
    assert s.steps == (tr.nsteps, tr.nsteps)
    assert tr.nsteps <= plan(spec, "multitree").steps[0] + 1
    assert plan(spec, "multitree", engine="translate") == s


@pytest.mark.parametrize("spec", ("torus:3x5", "torus:4x4", "torus:5x7"))
def test_part_from_tree_zero_equals_the_part_of_the_whole(spec):
    tr = translate(spec)
    s = tr.schedule()
    summary = tr.summary()
    assert all(np.array_equal(a, b) for a, b in zip(summary, _stream_summary(s)))
    for r in range(s.nranks):
        assert tr.rank_part(r, summary) == RankSchedule.of(s, r)


def test_translation_refuses_other_networks():
    for spec in ("torus:2x4", "mesh:4x4", "torus:4x4/20mbit", "ring:9", "torus:2x2x2"):
        with pytest.raises(ValueError, match="translation plans"):
            translate(spec)


def broken(spec, edit):
    tr = translate(spec)
    tr.step, tr.parent, tr.child, tr.dir = (a.copy() for a in (tr.step, tr.parent, tr.child,
                                                                 tr.dir))
    edit(tr)
    return tr


def test_check_catches_a_direction_twice_in_a_step():
    def edit(tr):  # the second edge of step 0 moved to the first edge's direction and link
        tr.dir[1], tr.child[1] = tr.dir[0], tr.child[0]
    tr = broken("torus:4x4", edit)
    errs = tr.check()
    assert any("direction used twice" in e for e in errs)
    assert any("joins tree 0 twice" in e for e in errs)
    assert any("misses 1 ranks" in e for e in errs)


def test_check_catches_a_parent_not_yet_in_the_tree_and_a_non_link():
    def edit(tr):
        last = len(tr.step) - 1
        tr.parent[0], tr.child[0] = tr.child[last], tr.child[last]  # no edge of rank to itself
    errs = broken("torus:5x5", edit).check()
    assert any("is not in tree 0 yet" in e for e in errs)
    assert any("is not a" in e for e in errs)


def test_general_validator_catches_a_broken_translate():
    def edit(tr):  # two edges of step 1 on one direction: translates share links
        at = np.flatnonzero(tr.step == 1)
        tr.step[at[0]] = 0
    tr = broken("torus:4x4", edit)
    s = tr.schedule()
    r = validate(s, "torus:4x4", engine="numba")
    assert not r.valid
    assert tr.check() != []


@pytest.mark.slow
@pytest.mark.parametrize("spec", ("torus:32x32", "torus:16x64"))
def test_auto_translates_large_tori_in_no_more_steps_than_the_general_grower(spec):
    from mtcoll.plan import TRANSLATE_FROM

    s = plan(spec, "multitree")
    assert s.nranks >= TRANSLATE_FROM
    assert s.meta["engine"] == "translate"
    assert s == translate(spec).schedule()
    assert s.steps[0] <= plan(spec, "multitree", engine="numba").steps[0]
    r = validate(s, spec, engine="numba")
    assert r.valid, r.errors
    # the parts a communicator scatters, from tree 0, are the parts of the whole
    for got, want in zip(rank_parts(spec), RankSchedule.split(s)):
        assert got == want


def test_auto_keeps_the_general_grower_below_the_threshold_and_off_plain_tori():
    for spec in ("torus:8x8", "torus:4x10"):
        assert plan(spec, "multitree") == plan(spec, "multitree", engine="python")
        assert all(a == b for a, b in zip(rank_parts(spec),
                                          RankSchedule.split(plan(spec, "multitree"))))
    # a torus with link options is not translated, whatever its size
    assert plan("torus:32x32/20mbit", "multitree").meta["engine"] == "numba"
