"""AROPD_MLX_LAB=long_sheet: the long distrust lab with the student view as a worksheet, read at
one fixed distance, and k <= 64 (docs/LAB.md, session 20)."""
import pytest

from aropd_mlx.lab import shipped

from shipped_checks import assert_reproduces, named_lab


def test_the_long_sheet_lab_is_the_long_distrust_lab_with_a_student_sheet_and_k_to_64():
    from dataclasses import replace

    from aropd_mlx.lab.defaults import NAMED_LABS, settings_from

    distrust, lab = (settings_from(NAMED_LABS[n]) for n in ("long_distrust", "long_sheet"))
    assert lab.warm_init == "long_distrust" and lab.student_sheet and not distrust.student_sheet
    assert (lab.k_max, lab.eval_ks[-1], lab.mixed_phases()) == (64, 64, [(300, 64, "warm_run",
                                                                          "all views")])
    same = ("spec", "full_copy_share", "full_copy_style", "full_copy_past_cut",
            "anchor_distrust_share", "warm_lr", "warm_view_mix", "question_last",
            "partial_outline")
    assert replace(lab, **{f: getattr(distrust, f) for f in same}) == lab


@pytest.mark.skipif(shipped.manifest(shipped.shipped_dir("long_sheet")) is None,
                    reason="no long sheet lab model shipped in this checkout")
def test_the_shipped_long_sheet_lab_reproduces_its_student_on_long_problems():
    """Its student view, a worksheet, greedy on held-out problems at a short k and at k = 56
    (correct responses of 344 tokens), within sampling noise of the numbers it shipped with."""
    folder, settings, views = named_lab("long_sheet")
    assert views.student_outline
    assert_reproduces(folder, settings, views, (8, 56), names=("student",))
