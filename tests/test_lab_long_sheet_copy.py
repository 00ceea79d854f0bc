"""AROPD_MLX_LAB=long_sheet_copy: the sheet lab whose full view has its hindsight back (more
copy rows on top of long_sheet; docs/LAB.md, sessions 20-21)."""
import pytest

from aropd_mlx.lab import shipped

from shipped_checks import assert_reproduces, assert_slip_probe, named_lab


def test_the_long_sheet_copy_lab_is_the_sheet_lab_with_more_copy_rows():
    from dataclasses import replace

    from aropd_mlx.lab.defaults import NAMED_LABS, settings_from

    sheet, lab = (settings_from(NAMED_LABS[n]) for n in ("long_sheet", "long_sheet_copy"))
    assert lab.warm_init == "long_sheet" and lab.student_sheet
    assert lab.mixed_phases() == [(100, 64, "warm_run", "all views")]
    assert (lab.full_copy_share, tuple(lab.warm_view_mix)) == (0.5, (0.7, 0.15, 0.15))
    changed = ("warm_init", "warm_steps", "full_copy_share", "warm_view_mix")
    assert replace(lab, **{f: getattr(sheet, f) for f in changed}) == sheet
    assert lab.key() == "6014709268c7"  # the build measured in docs/LAB.md, session 20


@pytest.mark.skipif(shipped.manifest(shipped.shipped_dir("long_sheet_copy")) is None,
                    reason="no long sheet copy lab model shipped in this checkout")
def test_the_shipped_long_sheet_copy_lab_reproduces_its_views_and_the_full_views_hindsight():
    """Its student and full view, greedy on held-out problems at a short k and at k = 56
    (344-token responses), and the late-slip probe on dev problems (2 per k): the full view asks
    for its reference's result, the anchor for the response's."""
    folder, settings, views = named_lab("long_sheet_copy")
    assert views.student_outline
    assert_reproduces(folder, settings, views, (8, 56), names=("student", "full"))
    assert_slip_probe(folder, settings, views, 2, 0.2)
