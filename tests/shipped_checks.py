"""Checks of a shipped lab model that several test files share: its folder and views, its
recorded held-out numbers reproduced on this machine, its slip probe."""
from aropd_mlx.lab import shipped
from aropd_mlx.lab.measure import rates_by_k


def named_lab(name: str):
    """A named lab's (NAMED_LABS) shipped folder, its settings and its views' layout."""
    from aropd_mlx.config import load_config
    from aropd_mlx.lab.defaults import NAMED_LABS, lab_view_overrides, settings_from

    settings = settings_from(NAMED_LABS[name])
    views = load_config(overrides=lab_view_overrides(settings)).views
    return shipped.shipped_dir(name), settings, views


def assert_reproduces(folder, settings, views, ks, names=("student", "full")) -> None:
    """The shipped model in `folder`: every file's hash, the recipe of `settings`, and its
    recorded held-out numbers (greedy, all-steps-correct at `ks` under the views `names`)
    reproduce on this machine (within a few problems: another CPU may round a logit
    differently)."""
    from mlx_lm import load

    from aropd_mlx.data import Example
    from aropd_mlx.lab.measure import view_responses
    from aropd_mlx.lab.setup import eval_examples

    found = shipped.verify(folder)
    assert found["recipe"] == shipped.recipe(settings)  # the lab's runs start from it
    model, tok = load(str(folder))
    examples = [Example(**e) for e in eval_examples(settings)
                if len(e["solution"].splitlines()) in ks]
    for view in names:
        got = rates_by_k(examples, view_responses(model, tok, examples, views, view, 0.0,
                                                  6 * settings.k_max + 8, seed=0))
        for k in map(str, ks):
            want = found["measured"][view]["by_k"][k]["all_steps_correct"]
            assert abs(got["by_k"][k]["all_steps_correct"] - want) <= 0.05, (view, k)



def assert_slip_probe(folder, settings, views, n_per_k: int, tolerance: float, slip="late"):
    """The slip probe of the shipped model in `folder` on dev problems: each view's P(reference's
    result) within `tolerance` of its recorded number; returns the probe for further checks. After
    a late slip the full view must ask for the reference's result and the anchor must not."""
    from mlx_lm import load

    from aropd_mlx.lab.hindsight import hindsight
    from aropd_mlx.lab.measure import dev_examples

    model, tok = load(str(folder))
    key = "hindsight" if slip == "late" else "hindsight_early"
    want = shipped.manifest(folder)["measured"][key]
    got = hindsight(model, tok, dev_examples(settings, n_per_k), views, slip=slip)
    for view in ("partial", "full"):
        assert abs(got[view]["next_result"]["oracle"] - want[view]["next_result"]["oracle"]) < tolerance, (key, view)
    if slip == "late":
        assert got["full"]["next_result"]["oracle"] > 0.5 > 0.1 > got["partial"]["next_result"]["oracle"]
    return got
