"""AROPD_MLX_LAB=long_distrust: the long lab whose full view has hindsight past the anchor's cut
while its anchor computes on from a slip inside its half (docs/LAB.md, session 17)."""
import pytest

from aropd_mlx.lab import shipped

from shipped_checks import assert_reproduces, assert_slip_probe, named_lab


def test_the_long_distrust_lab_is_the_long_hindsight_lab_with_copy_rows_past_the_cut_and_distrust_rows():
    from aropd_mlx.lab.defaults import NAMED_LABS, settings_from

    long_h, lab = (settings_from(NAMED_LABS[n]) for n in ("long_hindsight", "long_distrust"))
    assert lab.warm_init == "long" and lab.spec == long_h.spec
    assert lab.mixed_phases() == long_h.mixed_phases() and not lab.student_phases()
    assert (lab.full_copy_share, lab.full_copy_style, lab.full_copy_past_cut) == (0.3, "slipped", True)
    assert (lab.anchor_distrust_share, lab.warm_lr) == (0.2, 1e-3)
    assert lab.key() not in (long_h.key(), settings_from(NAMED_LABS["long"]).key())


@pytest.mark.skipif(shipped.manifest(shipped.shipped_dir("long_distrust")) is None,
                    reason="no long distrust lab model shipped in this checkout")
def test_the_shipped_long_distrust_lab_reproduces_its_numbers_and_both_slip_probes():
    """Its model: greedy student and anchor at a short and a long k (held-out), and
    the slip probe on dev problems (4 per k): after a slip past the cut the full view asks for
    the reference's result and the anchor for the response's; after a slip inside the anchor's
    half the anchor still goes on from the written value (the long hindsight lab's copies it)."""
    folder, settings, views = named_lab("long_distrust")
    assert_reproduces(folder, settings, views, (5, 30), names=("student", "partial"))
    assert_slip_probe(folder, settings, views, 4, 0.15)
    partial_early = assert_slip_probe(folder, settings, views, 4, 0.15, slip="early")["partial"]["next_result"]
    assert partial_early["consistent"] > 0.5 > partial_early["oracle"]
