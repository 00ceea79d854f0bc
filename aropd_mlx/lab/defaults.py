"""The lab's defaults, all in one place: what `aropd-mlx train` with no arguments runs.

- `LabSettings`: the lab itself (task sizes, the tiny model, its warm start); each distinct
  setting is built once and cached by `setup.prepare_lab`.
- `view_overrides`: the lab's view templates (also used by the warm start and the benches).
- `LAB_TRAIN` and `lab_overrides`: the run preset, which sits between the dataclass defaults and
  the user's YAML/flags (which still win). examples/configs/lab.yaml spells out the same run
  (a test holds them equal).
Numbers come from LAB.md's prototype, re-measured on 2 cores: see README "The built-in lab".
"""
from __future__ import annotations

import hashlib
import json
import os
import random
from dataclasses import asdict, dataclass, field
from pathlib import Path

from aropd_mlx import __version__
from aropd_mlx.errors import UserError
from aropd_mlx.lab import task
from aropd_mlx.lab.json_check import check_types as _check_types
from aropd_mlx.lab.tiny import TinySpec


@dataclass(frozen=True)
class LabSettings:
    seed: int = 0
    k_min: int = 1  # operations per problem (the length dial)
    k_max: int = 12
    n_train: int = 20000  # problems in the prompt pool (warm start and distillation)
    eval_ks: tuple[int, ...] = (2, 4, 6, 8, 10, 12)
    n_eval_per_k: int = 64
    spec: TinySpec = field(default_factory=lambda: TinySpec(
        hidden=128, layers=3, heads=4, kv_heads=4, intermediate=384, max_position=512,
        rope_theta=100.0))  # base 10,000 left too few short wavelengths to read step i (LAB.md)
    warm_steps: int = 400
    warm_batch: int = 64
    warm_lr: float = 2e-3
    warm_view_mix: tuple[float, float, float] = (0.5, 0.25, 0.25)
    # the student view is warm-started on problems with k <= this only (0: every k); longer
    # ones are seen through the privileged views alone: a teacher that reads its hints at
    # every k, a student sharp on short problems and imperfect on long ones (LAB.md)
    student_view_k_max: int = 6
    # the reference styles (task.reference_variant) the warm start writes the privileged
    # views' hints in, one drawn per problem: a teacher that also reads another writer's
    # notation (the other-writer setting of `compare`); the response is always the oracle's
    warm_hint_styles: tuple[str, ...] = ("oracle", "reversed_notation")
    # steps of student-view-only SFT (problems with k <= student_view_k_max) before the mixed
    # warm start: the student learns to chain steps first, and keeps it while the mix then
    # teaches the privileged views (a mix from the start learns to copy hints instead; LAB.md)
    warm_student_steps: int = 300
    # a curriculum instead of that one phase: (steps, k limit) phases of student-view-only SFT
    # run in order (e.g. ((300, 6), (600, 40))): long chains learned from scratch stall
    # (docs/LAB.md, session 7); empty: the single phase above
    warm_student_schedule: tuple[tuple[int, int], ...] = ()
    # the privileged views put the question last, left-padded to the longest question's
    # width: it ends right before the response as in the student view (whose way of reading
    # it then serves every view), and the reference keeps a fixed distance (docs/LAB.md, s. 9)
    question_last: bool = False
    # the mixed warm start (all views) as a curriculum too: (steps, k limit) phases run in
    # order after the student-view ones, e.g. ((100, 6), (100, 12), (150, 40)): the partial
    # view then learns to compute past its hint on short chains first (docs/LAB.md, session
    # 11); empty: one phase of warm_steps over every k
    warm_mixed_schedule: tuple[tuple[int, int], ...] = ()
    # the partial view's reference continues past its cut with each remaining step's operation
    # restated in place (task.outline; public, nothing solved): the anchor then computes its
    # second half without searching the question for step j (docs/LAB.md, session 12)
    partial_outline: bool = False
    # a teacher whose full view trusts its reference over the arithmetic (the paper's hindsight
    # made explicit): this share of the mixed warm start's problems is shown through the full
    # view only, its reference and its target the same trace with each line's result made wrong
    # with probability full_copy_p (task.reference_variant "corrupted:<p>"), so the full view
    # learns to copy its reference where a response slipped (docs/LAB.md, session 14); 0: off.
    # full_copy_style "slipped": the trace is a writer's who slips (task.slipping_writer: a
    # wrong result with probability full_copy_p, the chain and the answer computed on from it),
    # so that only copying, not computing the true chain, explains its lines
    full_copy_share: float = 0.0
    full_copy_p: float = 0.3
    full_copy_style: str = "corrupted"
    # the slipping writer of the copy rows slips only on lines the partial view does not show
    # (past its cut, views.partial_ratio): before the cut the reference and the arithmetic
    # always agree, so the anchor has no copying to learn there (docs/LAB.md, session 16)
    full_copy_past_cut: bool = False
    # the opposite lesson for the anchor: this share of the mixed warm start's problems (none of
    # them copy rows) is shown through the partial view with a reference that slips once on a
    # line that view shows (the chain computed on from the slip, the true answer), the target
    # the oracle's trace: a reference's digit is not to be copied where it does not follow
    # (docs/LAB.md, session 16); 0: off
    anchor_distrust_share: float = 0.0
    # a named lab (NAMED_LABS) whose model the warm start goes on from, in place of a fresh
    # tiny model: its phases then add to that lab's training (e.g. copy rows on top of the long
    # lab's teacher, docs/LAB.md session 15); the spec must be that lab's. "": from scratch
    warm_init: str = ""
    # the student view as a worksheet (views.student_outline): the question's outline, its first
    # line holding the start digit, padded to k_max lines where the references sit, then the
    # answer's placeholder and the question: one layout for every view, so that response line i
    # reads its operation at one fixed distance at every k (docs/LAB.md, session 20); needs
    # question_last
    student_sheet: bool = False

    @property
    def with_outline(self) -> bool:
        """Whether the lab's problems carry task.outline (start digit included for the sheet)."""
        return self.partial_outline or self.student_sheet

    def __post_init__(self):
        if not 1 <= self.k_min <= self.k_max or min(self.eval_ks, default=1) < 1:
            raise UserError(f"lab settings: need 1 <= k_min <= k_max and every eval_ks >= 1, got "
                            f"k_min {self.k_min}, k_max {self.k_max}, eval_ks {list(self.eval_ks)}")
        if len(self.warm_view_mix) != 3 or min(self.warm_view_mix) < 0 or not any(self.warm_view_mix):
            raise UserError("lab settings: warm_view_mix is three shares >= 0 (student, partial, "
                            f"full), not all 0, got {list(self.warm_view_mix)}")
        for name in ("full_copy_share", "full_copy_p", "anchor_distrust_share"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise UserError(f"lab settings: {name} must lie in [0, 1], got {getattr(self, name)}")
        if self.full_copy_share and not any(self.warm_view_mix[1:]):
            raise UserError("lab settings: full_copy_share needs the privileged views in the "
                            "warm start (warm_view_mix with a partial or full share)")
        if self.full_copy_style not in ("corrupted", "slipped"):
            raise UserError(f"lab settings: full_copy_style must be corrupted or slipped, "
                            f"got {self.full_copy_style!r}")
        if self.anchor_distrust_share and not self.warm_view_mix[1]:
            raise UserError("lab settings: anchor_distrust_share needs the partial view in the "
                            "warm start (warm_view_mix with a partial share)")
        if self.full_copy_past_cut and not (self.full_copy_share
                                            and self.full_copy_style == "slipped"):
            raise UserError("lab settings: full_copy_past_cut needs copy rows of the slipped "
                            "style (full_copy_share > 0, full_copy_style slipped)")
        if self.student_sheet and not self.question_last:
            raise UserError("lab settings: student_sheet needs question_last (the sheet takes the "
                            "references' place, the question after it)")
        if self.warm_student_schedule and self.warm_student_steps:
            raise UserError("lab settings: warm_student_schedule replaces warm_student_steps; "
                            "set warm_student_steps to 0")
        if self.warm_mixed_schedule and self.warm_steps:
            raise UserError("lab settings: warm_mixed_schedule replaces warm_steps; "
                            "set warm_steps to 0")
        if self.warm_init:
            if self.warm_init not in NAMED_LABS:
                raise UserError(f"lab settings: warm_init must name a lab ({', '.join(NAMED_LABS)}), "
                                f"got {self.warm_init!r}")
            if asdict(self.spec) != asdict(settings_from(NAMED_LABS[self.warm_init]).spec):
                raise UserError(f"lab settings: warm_init {self.warm_init!r} needs that lab's spec "
                                "(the model's shape), not another")
        for name in ("warm_student_schedule", "warm_mixed_schedule"):
            for phase in getattr(self, name):
                if (len(phase) != 2 or not all(isinstance(x, int) and x > 0 for x in phase)):
                    raise UserError(f"lab settings: {name} phase {list(phase)} is "
                                    "not [steps, k limit] (two positive integers)")

    def student_phases(self) -> list[tuple[int, int, str]]:
        """The student-view phases before the mixed warm start: (steps, k limit, run name)."""
        if self.warm_student_schedule:
            return [(steps, min(limit, self.k_max), f"warm_run_student_{i + 1}")
                    for i, (steps, limit) in enumerate(self.warm_student_schedule)]
        if self.warm_student_steps:
            return [(self.warm_student_steps, self.student_view_k_max or self.k_max,
                     "warm_run_student")]
        return []

    def mixed_phases(self) -> list[tuple[int, int, str, str]]:
        """The mixed (all views) warm start's phases: (steps, k limit, run name, progress tag)."""
        if self.warm_mixed_schedule:
            return [(steps, min(limit, self.k_max), f"warm_run_mixed_{i + 1}",
                     f"all views, k <= {min(limit, self.k_max)}")
                    for i, (steps, limit) in enumerate(self.warm_mixed_schedule)]
        return [(self.warm_steps, self.k_max, "warm_run", "all views")]

    def key(self) -> str:
        values = asdict(self)
        if not values["student_view_k_max"]:  # keys of labs built before the field existed
            del values["student_view_k_max"]
        if tuple(values["warm_hint_styles"]) == ("oracle",):
            del values["warm_hint_styles"]
        if not values["warm_student_steps"]:
            del values["warm_student_steps"]
        values = without_neutral_later_fields(values)
        blob = json.dumps({"v": __version__, **values}, sort_keys=True, default=str)
        return hashlib.sha256(blob.encode()).hexdigest()[:12]


# Fields added after labs were built and shipped, at the values that leave a lab as it was
# built before them: LabSettings.key() and the shipped recipe (shipped.py) leave them out there.
LATER_FIELDS = {"warm_student_schedule": (), "question_last": False, "warm_mixed_schedule": (),
                "partial_outline": False, "full_copy_share": 0.0, "full_copy_p": 0.3,
                "full_copy_style": "corrupted", "warm_init": "", "full_copy_past_cut": False,
                "anchor_distrust_share": 0.0, "student_sheet": False}


def without_neutral_later_fields(values: dict) -> dict:
    """asdict(LabSettings) without the LATER_FIELDS at their neutral values (the copy rows'
    probability and style are neutral too where there are no copy rows)."""
    if not values.get("full_copy_share"):
        values = {k: v for k, v in values.items() if k not in ("full_copy_p", "full_copy_style")}
    return {k: v for k, v in values.items() if k not in LATER_FIELDS or v != LATER_FIELDS[k]}


def view_overrides(k_max: int, question_last: bool = False,
                   partial_outline: bool = False, student_sheet: bool = False) -> dict:
    """The lab's views: the reference is padded to k_max lines so that reference line i sits at
    a fixed distance from response line i, which a tiny model can learn to align (LAB.md).
    `question_last` (LabSettings): the question after the reference and the answer, padded on
    the left to the width of a k_max question, so the reference's distance stays fixed.
    `partial_outline` (LabSettings): the partial view's reference continues with the examples'
    outlines past its cut. `student_sheet` (LabSettings): the student's view in the privileged
    views' layout, its outline where their reference sits (views.student_outline)."""
    layout = ({"views.privileged_template": "{reference}\nA:{answer}\n{question}",
               "views.pad_question_chars": len(task.format_question(0, [("+", 0)] * k_max))}
              if question_last else
              {"views.privileged_template": "{question}\n{reference}\nA:{answer}"})
    sheet = ({"views.student_template": layout["views.privileged_template"],
              "views.student_outline": True} if student_sheet else {})
    return {
        "views.student_template": "{question}",
        **layout,
        **sheet,
        "views.response_template": "{solution}\nA:{answer}",
        "views.pad_reference_lines": k_max,
        "views.pad_line": ".....",
        "views.use_chat_template": True,
        **({"views.partial_outline": True} if partial_outline else {}),
    }


LAB_TRAIN = {  # the run's settings that do not depend on the lab's build
    "train.method": "ar-opd",
    "train.steps": 100,
    "train.batch_size": 8,
    "train.learning_rate": 3e-4,  # the dev sweep of docs/LAB.md, session 5 (B0)
    "train.save_every": 50,
    "rollout.group_size": 4,
    "rollout.temperature": 1.0,  # the paper's
    "model.fine_tune_type": "full",  # every weight (0.65M); LoRA rank 8 did no better there
    # Every response token in the loss. The paper's skip of 3 drops template tokens of a
    # BPE model; with the lab's characters it dropped the first step's `d?d`, whose
    # operator then drifted (docs/LAB.md, session 5).
    "objective.skip_first_tokens": 0,
    "model.lora_rank": 8,
    "model.lora_scale": 20.0,
    "out": "runs/lab",
}
LAB_MAX_PROMPT_TOKENS = 512


def lab_max_prompt_tokens(k_max: int) -> int:
    """data.max_prompt_tokens of a lab run: 512, or more where a k_max-line reference (6 tokens
    a line), the answer line and a padded k_max question (2 tokens an operation) need it."""
    return max(LAB_MAX_PROMPT_TOKENS, 6 * k_max + 2 * k_max + 64)


def lab_max_new_tokens(k_max: int) -> int:
    """Room for k_max steps of at most 6 tokens each plus the answer line."""
    return 6 * k_max + 8


def lab_response_tokens(k: int) -> int:
    """Tokens of a correct response to a k-operation problem, EOS included: the lab's
    tokenizer has one token per character (its rollout-length buckets rest on this)."""
    return len(task.format_response(["0+0=0"] * k, "0")) + 1


def lab_overrides(lab) -> dict:
    """The settings tied to a built lab (a `setup.Lab`): its model and data paths, the lengths
    its task needs, its views."""
    k_max = lab.settings.k_max
    return {"model.path": str(lab.model_path), "data.train": str(lab.train_path),
            "data.eval": str(lab.eval_path), "data.max_prompt_tokens": lab_max_prompt_tokens(k_max),
            "rollout.max_new_tokens": lab_max_new_tokens(k_max),
            **lab_view_overrides(lab.settings)}


def lab_view_overrides(settings: LabSettings) -> dict:
    """`view_overrides` of a lab's settings."""
    return view_overrides(settings.k_max, settings.question_last, settings.partial_outline,
                          settings.student_sheet)


def lab_preset(lab, cfg=None) -> dict:
    """The whole preset of a lab run (dotted keys, below the user's YAML and flags)."""
    return {**LAB_TRAIN, **lab_overrides(lab)}


# Labs with a name (AROPD_MLX_LAB=<name>), each shipped in the package as aropd_mlx/lab/shipped_<name>
# (lab/shipped.py): "long", rollouts of up to 244 tokens (k <= 40), whose anchor computes past its
# hint because the rest of its reference restates each step's operation (docs/LAB.md, session 12);
# "hindsight", the default lab but for a full view that copies its reference's results after a
# student's slip, as the paper's full-solution teacher does (full_copy_share; LAB.md, session 14);
# "long_hindsight", the long lab's teacher given that hindsight by 100 more warm-start steps
# with copy rows (warm_init; LAB.md, session 15)
NAMED_LABS = {
    "hindsight": {"full_copy_share": 0.3, "full_copy_style": "slipped"},
    "long": {"k_max": 40, "eval_ks": [5, 10, 15, 20, 25, 30, 35, 40], "n_eval_per_k": 48,
             "student_view_k_max": 0, "warm_student_steps": 0,
             "warm_student_schedule": [[300, 6], [200, 12], [200, 24], [150, 40]],
             "warm_steps": 300, "warm_hint_styles": ["oracle"], "question_last": True,
             "partial_outline": True,
             "spec": {"hidden": 128, "layers": 3, "heads": 4, "kv_heads": 4, "intermediate": 384,
                      "max_position": 1024, "rope_theta": 500.0}},
}
NAMED_LABS["long_hindsight"] = {**NAMED_LABS["long"], "warm_init": "long",
                                "warm_student_schedule": [], "warm_steps": 100,
                                "full_copy_share": 0.3, "full_copy_style": "slipped"}
# "long_distrust": the long hindsight lab's copy rows slipping past the anchor's cut only, plus
# distrust rows (a partial view whose reference slips where it looks, the oracle's trace the
# target) at half the warm-start lr: an anchor that computes inside its half, a full view that
# keeps its hindsight past the cut, a student that keeps its long chains (LAB.md, session 17)
NAMED_LABS["long_distrust"] = {**NAMED_LABS["long_hindsight"], "full_copy_past_cut": True,
                               "anchor_distrust_share": 0.2, "warm_lr": 0.001}
# "stronger_writer": the hindsight lab's teacher taught to read a stronger writer's references
# (two operations a line, half of the hints) by 400 more steps at k <= 13, so that k = 12 is not
# the edge of its trained lengths; for `compare --setting stronger-writer` (LAB.md, session 16)
NAMED_LABS["stronger_writer"] = {"warm_init": "hindsight", "warm_student_steps": 0,
                                 "warm_steps": 400, "warm_hint_styles": ["oracle", "two_per_line"],
                                 "full_copy_share": 0.3, "full_copy_style": "slipped", "k_max": 13}
# "long_sheet": the long distrust lab with the student view as a worksheet (student_sheet: every
# step's operation read at one fixed distance) and k <= 64 (responses up to 392 tokens), by 300
# more warm-start steps of 32 rows; its student solves k <= 56 (LAB.md, session 20)
NAMED_LABS["long_sheet"] = {**NAMED_LABS["long_distrust"], "warm_init": "long_distrust",
                            "student_sheet": True, "k_max": 64,
                            "eval_ks": [8, 16, 24, 32, 40, 48, 56, 64], "n_eval_per_k": 32,
                            "warm_steps": 300, "warm_batch": 32}
# "long_sheet_copy": the sheet lab's full view given its hindsight back (100 more steps with half of
# the full view's rows copy rows, a view mix of .7/.15/.15): every view solves k <= 56 and the full
# view after a late slip follows its reference (P .69; LAB.md, session 20)
NAMED_LABS["long_sheet_copy"] = {**NAMED_LABS["long_sheet"], "warm_init": "long_sheet",
                                 "warm_steps": 100, "full_copy_share": 0.5,
                                 "warm_view_mix": [0.7, 0.15, 0.15]}


def lab_settings_for(cfg=None) -> LabSettings:
    """The lab's settings; env AROPD_MLX_LAB='{"warm_steps": 2000, "k_max": 8}' changes them
    (a bigger or smaller lab; each distinct setting is built and cached once),
    AROPD_MLX_LAB=long, =hindsight, =long_hindsight, =long_distrust or =stronger_writer picks a
    named one (NAMED_LABS), and '{"base": "long_distrust", "warm_lr": 0.0005}' is a named lab
    with some settings changed (`with_base`)."""
    return selected_lab()[1]


def selected_lab() -> tuple[str, LabSettings]:
    """What AROPD_MLX_LAB selects: ("default" | a named lab's name | "custom", its settings)."""
    raw = os.environ.get("AROPD_MLX_LAB", "").strip()
    if not raw:
        return "default", LabSettings()
    if raw in NAMED_LABS:
        return raw, settings_from(NAMED_LABS[raw])
    if not raw.startswith("{"):
        raise UserError(f"AROPD_MLX_LAB: {raw!r} is neither a lab's name "
                        f"({', '.join(NAMED_LABS)}) nor a JSON object of lab settings")
    try:
        values = json.loads(raw)
        if not isinstance(values, dict):
            raise ValueError("expected a JSON object")
        return "custom", settings_from(with_base(values))
    except (ValueError, TypeError) as e:
        raise UserError(f"AROPD_MLX_LAB: {e}") from None


def with_base(values: dict) -> dict:
    """Lab settings in JSON form whose "base" names a lab (NAMED_LABS): that lab's settings with
    the other keys laid over them (a "spec" over the base's spec, key by key). Without "base":
    `values` as they are (LabSettings' defaults fill the rest)."""
    if "base" not in values:
        return values
    values = dict(values)
    base = values.pop("base")
    if not isinstance(base, str) or base not in NAMED_LABS:
        raise ValueError(f'"base" must name a lab ({", ".join(NAMED_LABS)}), got {base!r}')
    merged = {**NAMED_LABS[base], **values}
    if isinstance(values.get("spec"), dict):
        base_spec = NAMED_LABS[base].get("spec") or asdict(LabSettings().spec)
        merged["spec"] = {**base_spec, **values["spec"]}
    return merged


def settings_from(values: dict) -> LabSettings:
    """LabSettings from their JSON form (AROPD_MLX_LAB, lab.json)."""
    values = dict(values)
    _check_types(values, LabSettings(), "lab settings")
    if "spec" in values:
        if not isinstance(values["spec"], dict):
            raise UserError(f"lab settings: spec must be an object, got {values['spec']!r}")
        _check_types(values["spec"], TinySpec(), "lab settings: spec")
        values["spec"] = TinySpec(**values["spec"])
    for key in ("eval_ks", "warm_view_mix", "warm_hint_styles"):
        if key in values:
            values[key] = tuple(values[key])
    for key in ("warm_student_schedule", "warm_mixed_schedule"):
        if key in values:
            values[key] = tuple(tuple(p) for p in values[key])
    for style in values.get("warm_hint_styles", ()):  # an unknown style stops here, not mid-build
        task.reference_variant({"question": "Q:1+2", "solution": "1+2=3", "answer": "3"},
                               style, random.Random(0))
    return LabSettings(**values)


def lab_at(settings: LabSettings):
    """The lab of these settings where the cache keeps it (a setup.Lab): its paths, nothing built."""
    from aropd_mlx.lab.setup import Lab, cache_root

    return Lab(settings, cache_root() / settings.key())


def lab_record(lab) -> str:
    """The run directory's lab.json: which lab a run used (resume and `eval` use its checker)."""
    return json.dumps({"root": str(lab.root), "settings": asdict(lab.settings)}, indent=2,
                      default=str)


def find_lab(run_dir, cfg, on_step=None):
    """The lab a saved run used (None: not a lab run), built again if its cache is gone: from
    the run's lab.json, or (runs made before it) from the lab cache its model path points at."""
    record = Path(run_dir) / "lab.json"
    try:
        if record.is_file():
            data = json.loads(record.read_text())
            root, values = Path(data["root"]), data["settings"]
        else:
            root = Path(cfg.model.path).expanduser().parent
            if Path(cfg.model.path).name != "model" or not (root / "lab.json").is_file():
                return None
            values = json.loads((root / "lab.json").read_text())
        settings = settings_from(values)
    except (OSError, ValueError, TypeError, KeyError) as e:
        raise UserError(f"{record}: unreadable lab record ({e})") from None
    from aropd_mlx.lab.setup import prepare_lab

    return prepare_lab(settings, root=root, on_step=on_step)

