"""Diagnostics on a full run's own models (stops 27 and 30): downstream runs from start points or seeds the protocol
does not have, trained and evaluated exactly as the full run's methods (same demonstrations, steps, learning rate,
test placements (since stop 31 each seed on placements of its own, as the run's) and variants; the script first
checks that its configs for SFT, auxiliary SFT and, where the run has
it, auxiliary SFT with the control, all from theta_pt, are field for field those the full run trained (a), (b) and
(b') with), compared with each other and with the full run's methods, paired by (seed, task).

    PYTHONPATH=src .venv/bin/python docs/results/diagnostics/run.py STUDY FULL_RUN_FOLDER WORK_FOLDER \
        docs/results/diagnostics

writes STUDY.md and STUDY.json beside this script. teacher_gamma takes a fifth argument, the frozen 3D teacher's
folder (the one `capvector headroom --regime views-confirm-shift-more` pretrained and chose its weight for), as
does teacher_seeds; untrained_teachers takes teacher_seeds' work folder.
Resumable: finished trainings and evaluations in the work folder (the third argument) are kept (evaluations under
the hash of their plan, so a changed plan evaluates anew). The studies' motivations quote the figures that prompted
them; base and augment ran on stop 27's models, gone since, and were not evaluated again.

base: does gamma need the weights it was extracted on? In the full run SFT from theta_ao beat SFT from theta_ft by
13-15 points on the held-out tasks, yet theta_pt + 0.25 gamma (alpha chosen on validation placements) was no better
than SFT from theta_pt. theta_ao = theta_pt + tau + gamma (tau = theta_ft - theta_pt), so the two differ in gamma's
base (theta_ft or theta_pt) and in alpha (1 or 0.25). Plain SFT (no L_orth) from theta_pt + gamma (alpha 1),
theta_pt + tau/2, and theta_pt + tau/2 + gamma separates the two.

augment: the issue asks that the teacher run online on augmented images, the same augmentation for every method; the
full run trained without (augment_shift 0). (a) and (b) again with every downstream step's images shifted at random
by up to 4 pixels (theta_pt's weights, its config's augment_shift set to 4): does the teacher's gain survive?

lora: in the full run with shifted images (stop 30), (e) CapVector with LoRA was the one method ahead of SFT
in-domain (+7 points), while (c) and (d), from the same theta_meta with full finetuning, were behind. Is that gamma
or LoRA? LoRA SFT (no L_orth) from theta_pt and from theta_meta, at (e)'s rank and learning rate.

control_seeds: in the same run the positive control, (b') auxiliary SFT with the localization objective, was +9
points over SFT in-domain, not resolved with 5 seeds ([-2, +15]). (a) and (b') again on 5 more seeds (5-9), each
exactly the run's config but for the seed, and the paired difference over all 10 ("both:" rows: the run's seeds 0-4
and these). Stop 31, with each seed on placements of its own, found (d') CapVector with the control's gamma +12
[+2, +19] over (a) on the run's seeds, the one resolved gain of a method over SFT: (d') on seeds 5-9 too, its
config built by the run's own protocol (reproduce.downstream_config) but for the seed, to see whether it holds.

control_meta: (d') CapVector with the control's gamma was ahead of SFT (+9.0 [+2, +16] over 10 seeds), the control's
own auxiliary SFT was not: is that the control's content, carried by gamma, or the extra training gamma holds? Plain
SFT, no L_orth, from the control's theta_meta ((c'), as (c) is to (d)), seeds 0-4.

control_trunk: the localization control reads the image-only visual tokens, and under the shift it gained +4.5
[-2, +10] over 10 seeds against the oracle's +38. The oracle is told the positions in the trunk, where the action
queries can read them. The global control (bench/objectives/privileged.py: every visual token regresses the object
and goal positions relative to the hand) at a trunk layer, where the visual tokens have met the state, instead: at
the middle and the last of the 3 trunk layers, weights 0.3 and 1, from theta_pt, seeds 0-4. Layer and weight are
chosen on the run's validation placements (in-domain, mean over the 5 seeds, against (a) evaluated there too), then
read on the test placements.

random_direction: in the control preset's run (stop 34: the localization control as the objective, 20
demonstrations per held-out task), SFT from theta_pt + gamma ((c), no L_orth) beat SFT from theta_pt by +11.5 [+5,
+20] points at 1000 steps and (d) CapVector by +12.3 [+8, +19]. Is that what gamma points at, or any move of its
size away from theta_pt (gamma's cosine with tau is -0.37: it partly undoes a finetuning update)? SFT from theta_pt
plus a random direction with gamma's norm in every tensor, and from theta_pt - gamma.

teacher_gamma: in the control preset's regime, does the paper's objective do what the control does? Stop 35's headroom
arm: alignment with the frozen 3D teacher (weight 0.1, chosen on validation placements) trained from scratch in
views-confirm-shift-more, the regime the control preset copies. Here, on the control run's models: (b) auxiliary
SFT with that teacher and weight from theta_pt, and (c) plain SFT from theta_pt + alpha * gamma_teacher, where
gamma_teacher = theta_ao' - theta_ft: theta_ao' the run's auxiliary extraction (its config field for field) with the
teacher's alignment in place of the control, theta_ft the run's own, alpha the run's. No (d): in this run L_orth
held nothing (gamma retained 1.000 with it, 1.013 without; (d) - (c) +0.8 and -0.5 points). The teacher's gamma
gave (c) +7.2 [+2, +12] points at 2000 steps: is that what the teacher learned in pretraining? The same extraction
aligned with the teacher's network untrained (its pretraining's initial weights, its features normalized on the same
frames) gives an untrained teacher's gamma, and (c) from it.

alpha_one: in the spatial-forcing run (stop 36: the 3D teacher as the objective in the control preset's regime),
alpha 0.5 was chosen on validation placements and (c) and (d) gained nothing (-0.3 and -1.8 points at 2000 steps),
while diagnostic teacher_gamma, with another teacher's gamma at alpha 1 on the control run's models (the same
theta_pt, theta_ft and (a)), gave (c) +7.2 [+2, +12]. Is it alpha or the gamma? (c) at alpha 1 with the run's own
gamma, seeds 0-4.

teacher_seeds: two teacher runs of the same settings gave gammas of opposite effect: with the headroom's teacher
(3030 training frames) (c) at alpha 1 gained +7.2 [+2, +12] points at 2000 steps (teacher_gamma), with the
spatial-forcing run's own (7127 frames) -2.3 [-15, +14] (alpha_one), on the same theta_pt, theta_ft and (a); the
two gammas' cosine is 0.471. Is that what a teacher holds, or which run it was? (c) at alpha 1 from the gammas of
five teachers: the run's teacher pretrained with seeds 0 (its own), 1 and 2, and the given (smaller) teacher with
seeds 0 (its own) and 1, each on its own frames with its own settings; gamma_teacher extracted as in
teacher_gamma; and the mean over the five, paired by (seed, task). The seed-0 arms are the two earlier studies' own
runs (their work folders' start and trained policies linked in: the same configs), evaluated here again.

untrained_teachers: in teacher_seeds, four of five teachers' gammas gave (c) +4.7 to +8.7 points at 2000 steps
and their mean +7.1 [+0, +13] at 1000 steps, while in teacher_gamma an untrained teacher's gamma gave +6.5 and +4.0.
Is what the gammas carry the teachers' pretraining? (c) at alpha 1 from the gammas of three untrained teachers: the
networks of teacher_seeds' reseeded teachers 1 and 2 and of its given teacher as their pretraining started them
(untrained_teacher), each extracted as in teacher_gamma, and their mean. The third is teacher_gamma's own run (its
start and trained policies linked in: the same config at the control run's alpha, 1), evaluated here again. The
fifth argument is teacher_seeds' work folder, whose teachers it reads.

seeds: (a) SFT, (c) SFT from theta_meta and (d) CapVector on 5 more seeds (5-9), each configured by the run's own
protocol but for the seed (the alpha the run chose), and the paired differences over all 10 ("both:" rows), for a
run whose (c) or (d) against (a) is near resolving with 5 seeds.
"""

import dataclasses
import shutil
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from capvector.bench.experiment.layout import RunLayout, checkpoint_folder, trained_policy
from capvector.bench.experiment.protocol import (
    GAMMA_CONTROL,
    NEW_ENV,
    DownstreamRun,
    ReproduceConfig,
    evaluated_variants,
    first_episode,
    method_vector,
    split_tasks,
    with_chosen_alpha,
)
from capvector.bench.experiment.report import Evaluations
from capvector.bench.experiment.reproduce import (
    Run,
    do_training,
    downstream_config,
    evaluate_checkpoints,
    evaluation_plan,
    run_training,
)
from capvector.bench.policy.configuration_policy import PolicyConfig
from capvector.bench.statistics import bootstrap_mean, paired_difference, points
from capvector.bench.teacher.configuration_teacher import TeacherConfig
from capvector.bench.teacher.modeling_teacher import RECORD_NAME, Teacher
from capvector.bench.teacher.pretraining import (
    TeacherPretraining,
    describe_teacher,
    load_frames,
    pretrain_teacher,
    pretraining_summary,
    probe,
    training_frames,
    with_feature_statistics,
)
from capvector.files import content_hash, read_json, write_json, write_text
from capvector.params.lazy import InMemoryTensor
from capvector.params.merging import merge
from capvector.params.vectors import CapabilityVector, extract, open_vector
from capvector.training.config import CONFIG_FILE, TrainConfig, config_hash, load_config

# (the full run's layout, where to write it) -> a policy folder; a start that extracts a vector of its own leaves it
# beside the policy as "<its folder>.gamma" (own_vectors reports it)
Start = Callable[[RunLayout, Path], Path]


def merged(tau_share: float, gamma_share: float) -> Start:
    """theta_pt + tau_share * tau + gamma_share * gamma."""

    def build(layout: RunLayout, path: Path) -> Path:
        base = layout.pretrained
        if tau_share:
            base = path.with_name(f"{path.name}.tau")
            shutil.rmtree(base, ignore_errors=True)  # left by a killed run
            merge(layout.pretrained, layout.tau, base, alpha=tau_share)
        if gamma_share:
            merge(base, layout.gamma, path, alpha=gamma_share)
            shutil.rmtree(path.with_name(f"{path.name}.tau"), ignore_errors=True)
        else:
            base.rename(path)
        return path

    return build


def random_direction(layout: RunLayout, path: Path) -> Path:
    """theta_pt + r: r a random direction in every tensor (seeded Gaussian), scaled to gamma's norm in that tensor."""
    gamma, generator = open_vector(layout.gamma), torch.Generator().manual_seed(0)
    tensors = {}
    for name in gamma:
        g = gamma[name].float()
        r = torch.randn(g.shape, generator=generator)
        tensors[name] = InMemoryTensor(name, r * (g.norm() / r.norm().clamp(min=1e-30)))
    merge(layout.pretrained, CapabilityVector(tensors), path)
    gamma.close()
    return path


def theta_meta(layout: RunLayout, path: Path) -> Path:
    """The full run's theta_meta at its chosen alpha (merged by its vector stage)."""
    alpha = read_json(layout.stage_record("select"))["outputs"]["alpha"]
    return layout.theta_meta(alpha)


def control_theta_meta(layout: RunLayout, path: Path) -> Path:
    """theta_pt + alpha * the control's gamma at the run's chosen alpha, the start of its (d')."""
    alpha = read_json(layout.stage_record("select"))["outputs"]["alpha"]
    return layout.theta_meta(alpha, GAMMA_CONTROL)


TEACHER_RECIPE = "capvector.bench.recipe:teacher_alignment"
# chosen on validation placements for the teacher arm of views-confirm-shift-more (0.1: 73.8%, 0.5: 65.6%)
TEACHER_WEIGHT = 0.1


def teacher_objective(teacher: Path) -> tuple[str, tuple[tuple[str, object], ...]]:
    return TEACHER_RECIPE, (("teacher", str(teacher)), ("weight", TEACHER_WEIGHT))


def teacher_theta_meta(teacher: Path, alpha: float | None = None) -> Start:
    """theta_pt + alpha * gamma_teacher (None: the run's alpha): gamma_teacher = theta_ao' - theta_ft, theta_ao'
    trained as the run's auxiliary extraction but with the teacher's alignment as its objective, beside `path`."""

    def build(layout: RunLayout, path: Path) -> Path:
        recorded = ReproduceConfig(**read_json(layout.run_file)["config"])
        chosen = read_json(layout.stage_record("select"))["outputs"]["alpha"] if alpha is None else alpha
        recipe, args = teacher_objective(teacher)
        ao = path.with_name(f"{path.name}.extract_aux")
        config = load_config(layout.extract("aux") / CONFIG_FILE)
        config = dataclasses.replace(config, out_dir=str(ao), auxiliary=recipe, auxiliary_args=dict(args))
        run_training(Run(recorded, layout, "auto"), config)
        gamma = path.with_name(f"{path.name}.gamma")
        if not gamma.exists():
            extract(trained_policy(ao), trained_policy(layout.extract("sft")), gamma).close()
        merge(layout.pretrained, gamma, path, alpha=chosen)
        return path

    return build


def reseeded_teacher(teacher: Path, train_seed: int, path: Path) -> Path:
    """`teacher` pretrained again into `path`, on its frames with its settings but the seed `train_seed` (its
    network's initial weights, its batches and shifts); `teacher` itself, linked at `path`, if it has that seed."""
    settings = read_json(teacher / RECORD_NAME)["pretraining"]
    if settings["train_seed"] == train_seed:
        if not path.exists():
            path.symlink_to(teacher)
        return path
    return pretrain_teacher(dataclasses.replace(TeacherPretraining(**settings), train_seed=train_seed), path)


def reseeded_teacher_theta_meta(teacher: Path | None, train_seed: int) -> Start:
    """teacher_theta_meta at alpha 1 with `teacher` (None: the run's own) pretrained with the seed `train_seed`
    (reseeded_teacher, beside the start)."""

    def build(layout: RunLayout, path: Path) -> Path:
        used = reseeded_teacher(teacher or layout.teacher, train_seed, path.with_name(f"{path.name}.teacher"))
        return teacher_theta_meta(used, alpha=1.0)(layout, path)

    return build


def untrained_teacher(teacher: Path, path: Path) -> Path:
    """`teacher`'s network as its pretraining started it (same seed, no step), its feature statistics set from the
    same frames: aligning with it teaches what random image features of that size do, not what pretraining added."""
    if path.exists():
        return path
    record = read_json(teacher / RECORD_NAME)
    settings, config = record["pretraining"], TeacherConfig.from_json(teacher / "config.json")
    frames = load_frames(Path(record["dataset"]), tuple(config.cameras), settings["frame_stride"])
    train = training_frames(frames, settings["validation_every"])
    torch.manual_seed(settings["train_seed"])
    untrained = with_feature_statistics(Teacher(config).eval(), frames.images[train])
    untrained.save_pretrained(
        path, record={"untrained_copy_of": str(teacher), "probe": probe(untrained, frames, train)}
    )
    return path


def untrained_teacher_theta_meta(teacher: Path, alpha: float | None = None) -> Start:
    """teacher_theta_meta with `teacher` untrained (untrained_teacher, beside the start), at `alpha` (None: the
    run's)."""

    def build(layout: RunLayout, path: Path) -> Path:
        used = untrained_teacher(teacher, path.with_name(f"{path.name}.teacher"))
        return teacher_theta_meta(used, alpha)(layout, path)

    return build


def augmented(shift: int) -> Start:
    """theta_pt's weights in a policy whose training images are shifted at random by up to `shift` pixels."""

    def build(layout: RunLayout, path: Path) -> Path:
        partial = path.with_name(f"{path.name}.partial")
        shutil.rmtree(partial, ignore_errors=True)
        shutil.copytree(layout.pretrained, partial)
        config = PolicyConfig.from_json(partial / "config.json")
        dataclasses.replace(config, augment_shift=shift).to_json(partial / "config.json")
        partial.rename(path)
        return path

    return build


@dataclass(frozen=True)
class Arm:
    start: Start
    strategy: str = "sft"  # or "aux": the full run's auxiliary objective (the teacher) at its weight
    finetune: str = "full"  # or "lora": adapters at the run's rank and LoRA learning rate, as (e)
    control: bool = False  # with "aux": the run's positive control as the auxiliary objective, as (b')
    # with "aux": another objective, (TrainConfig.auxiliary, its auxiliary_args), in place of the run's
    objective: tuple[str, tuple[tuple[str, object], ...]] | None = None
    # the run's own method (protocol.METHODS), configured by the run's protocol but for the seed: start and the
    # fields above are then unused
    method: str | None = None


@dataclass(frozen=True)
class Study:
    arms: dict[str, Arm]
    # (label, arm, its baseline); "full:<method>" is the full run's own method
    comparisons: list[tuple[str, str, str]]
    shown: list[str]  # the full run's methods whose success is listed beside the arms'
    run: str  # the committed full run whose models it studies, and when
    seeds: tuple[int, ...] = ()  # the arms' training seeds (none: the run's)
    # the arms and the full run's methods named "full:<method>" in the study (full finetuning only) evaluated on the
    # run's validation placements too, in-domain (VALIDATION), to choose among the arms there
    validate: bool = False


def from_pt(layout: RunLayout, path: Path) -> Path:
    """theta_pt, the full run's pretrained policy."""
    return layout.pretrained


def trunk_control(layer: int, weight: float) -> Arm:
    """Auxiliary SFT from theta_pt with the global control (privileged) at trunk layer `layer`."""
    args = (("layer", f"trunk.layers.{layer}"), ("weight", weight))
    return Arm(from_pt, "aux", objective=("capvector.bench.recipe:privileged", args))


SHIFTED = augmented(4)


def more_seeds(arms: dict[str, tuple[str, Arm]], run: str) -> Study:
    """(a) SFT and `arms` (name -> (row label, arm), each a method of the run) on seeds 5-9, against (a) on those
    seeds, on the run's seeds 0-4 and on all 10 ("both:")."""
    comparisons = [
        (f"{label} - (a), {seeds}", f"{prefix}{name}", f"{prefix}sft")
        for name, (label, _) in arms.items()
        for seeds, prefix in (("seeds 5-9", ""), ("seeds 0-4: the run's", "full:"), ("seeds 0-9", "both:"))
    ]
    return Study(
        {"sft": Arm(from_pt)} | {name: arm for name, (_, arm) in arms.items()},
        comparisons,
        ["full:sft", *(f"full:{name}" for name in arms)],
        run,
        seeds=(5, 6, 7, 8, 9),
    )


STUDIES = {
    "base": Study(
        {
            "gamma_on_pt": Arm(merged(0.0, 1.0)),
            "half_tau": Arm(merged(0.5, 0.0)),
            "half_tau_gamma": Arm(merged(0.5, 1.0)),
        },
        [
            ("theta_pt + gamma (alpha 1), SFT - (a) SFT", "gamma_on_pt", "full:sft"),
            ("theta_pt + tau/2 + gamma - theta_pt + tau/2", "half_tau_gamma", "half_tau"),
            ("theta_ft + gamma - theta_ft: (g) - (f), the full run's", "full:ao_sft", "full:ft_sft"),
            ("theta_pt + tau/2 - (a) SFT", "half_tau", "full:sft"),
            ("(c) theta_pt + 0.25 gamma - (a) SFT, the full run's", "full:meta_sft", "full:sft"),
        ],
        ["full:sft", "full:meta_sft", "full:ft_sft", "full:ao_sft"],
        "docs/results/full-no-shift's models (stop 27)",
    ),
    "augment": Study(
        {"sft_shift4": Arm(SHIFTED), "aux_shift4": Arm(SHIFTED, "aux")},
        [
            ("(b) - (a), both with shifted images", "aux_shift4", "sft_shift4"),
            ("(b) - (a), the full run's (no shift)", "full:aux", "full:sft"),
            ("(a) with shifted images - (a)", "sft_shift4", "full:sft"),
            ("(b) with shifted images - (b)", "aux_shift4", "full:aux"),
        ],
        ["full:sft", "full:aux"],
        "docs/results/full-no-shift's models (stop 27)",
    ),
    "lora": Study(
        {
            "lora_on_pt": Arm(from_pt, finetune="lora"),
            "lora_on_meta": Arm(theta_meta, finetune="lora"),
        },
        [
            ("LoRA SFT from theta_pt - (a) SFT", "lora_on_pt", "full:sft"),
            ("(e) CapVector with LoRA - LoRA SFT from theta_pt", "full:capvector_lora", "lora_on_pt"),
            (
                "(e) CapVector with LoRA - LoRA SFT from theta_meta: what L_orth adds",
                "full:capvector_lora",
                "lora_on_meta",
            ),
            ("LoRA SFT from theta_meta - from theta_pt: what gamma adds", "lora_on_meta", "lora_on_pt"),
            ("(e) CapVector with LoRA - (a) SFT, the full run's", "full:capvector_lora", "full:sft"),
        ],
        ["full:sft", "full:meta_sft", "full:capvector", "full:capvector_lora"],
        "docs/results/full-10-demos' models (stop 30)",
    ),
    "control_seeds": more_seeds(
        {
            "control_aux": ("(b')", Arm(from_pt, "aux", control=True)),
            "control_capvector": ("(d')", Arm(from_pt, method="control_capvector")),
        },
        "docs/results/full-10-demos' models (stop 30)",
    ),
    "control_meta": Study(
        {"control_meta_sft": Arm(control_theta_meta)},
        [
            ("(c') SFT from the control's theta_meta - (a) SFT", "control_meta_sft", "full:sft"),
            ("(d') - (c'): what L_orth adds to the control's gamma", "full:control_capvector", "control_meta_sft"),
            ("(d') - (a), the full run's", "full:control_capvector", "full:sft"),
        ],
        ["full:sft", "full:meta_sft", "full:control_capvector"],
        "docs/results/full-10-demos' models (stop 31)",
    ),
    "control_trunk": Study(
        {f"trunk{layer}_w{weight:g}": trunk_control(layer, weight) for layer in (1, 2) for weight in (0.3, 1.0)},
        [
            *(
                (f"trunk {layer}, weight {w:g} - (a) SFT", f"trunk{layer}_w{w:g}", "full:sft")
                for layer in (1, 2)
                for w in (0.3, 1.0)
            ),
            ("(b') the run's localization control - (a) SFT", "full:control_aux", "full:sft"),
        ],
        ["full:sft", "full:control_aux", "full:oracle"],
        "docs/results/full-10-demos' models (stop 30)",
        validate=True,
    ),
    "random_direction": Study(
        {"random_sft": Arm(random_direction), "minus_gamma_sft": Arm(merged(0.0, -1.0))},
        [
            ("SFT from theta_pt + a random vector of gamma's size - (a) SFT", "random_sft", "full:sft"),
            ("SFT from theta_pt - gamma - (a) SFT", "minus_gamma_sft", "full:sft"),
            ("(c) SFT from theta_pt + gamma - (a) SFT, the run's", "full:meta_sft", "full:sft"),
            ("(c) theta_pt + gamma - theta_pt + random: gamma's direction", "full:meta_sft", "random_sft"),
            ("(d) CapVector - (a) SFT, the run's", "full:capvector", "full:sft"),
        ],
        ["full:sft", "full:meta_sft", "full:capvector"],
        "docs/results/control's models (stop 34)",
    ),
    "alpha_one": Study(
        {"gamma_on_pt": Arm(merged(0.0, 1.0))},
        [
            ("(c) at alpha 1: SFT from theta_pt + gamma - (a) SFT", "gamma_on_pt", "full:sft"),
            ("(c) at the chosen alpha - (a) SFT, the run's", "full:meta_sft", "full:sft"),
            ("(c) at alpha 1 - (c) at the chosen alpha", "gamma_on_pt", "full:meta_sft"),
        ],
        ["full:sft", "full:meta_sft", "full:capvector"],
        "docs/results/spatial-forcing's models (stop 36)",
    ),
    "seeds": more_seeds(
        {"meta_sft": ("(c)", Arm(from_pt, method="meta_sft")), "capvector": ("(d)", Arm(from_pt, method="capvector"))},
        "docs/results/spatial-forcing's models (stop 36)",
    ),
}


def teacher_gamma(teacher: Path) -> Study:
    return Study(
        {
            "teacher_aux": Arm(from_pt, "aux", objective=teacher_objective(teacher)),
            "teacher_meta_sft": Arm(teacher_theta_meta(teacher)),
            "untrained_teacher_meta_sft": Arm(untrained_teacher_theta_meta(teacher)),
        },
        [
            ("(b) auxiliary SFT with the 3D teacher - (a) SFT", "teacher_aux", "full:sft"),
            ("(b) auxiliary SFT with the control - (a) SFT, the run's", "full:aux", "full:sft"),
            ("(c) SFT from theta_pt + the teacher's gamma - (a) SFT", "teacher_meta_sft", "full:sft"),
            ("(c) SFT from theta_pt + the control's gamma - (a) SFT, the run's", "full:meta_sft", "full:sft"),
            ("(c) the teacher's gamma - the control's", "teacher_meta_sft", "full:meta_sft"),
            (
                "(c) SFT from theta_pt + the untrained teacher's gamma - (a) SFT",
                "untrained_teacher_meta_sft",
                "full:sft",
            ),
            ("(c) the teacher's gamma - the untrained teacher's", "teacher_meta_sft", "untrained_teacher_meta_sft"),
        ],
        ["full:sft", "full:aux", "full:meta_sft", "full:capvector"],
        "docs/results/control's models (stop 35)",
    )


def teacher_seeds(teacher: Path) -> Study:
    teachers = (
        ("teacher", "the run's teacher", None, (0, 1, 2)),
        ("small_teacher", "the given teacher", teacher, (0, 1)),
    )
    arms, comparisons = {}, []
    for name, described, source, seeds in teachers:
        for seed in seeds:
            arms[f"{name}_seed{seed}"] = Arm(reseeded_teacher_theta_meta(source, seed))
            label = f"(c) from theta_pt + gamma, {described} pretrained with seed {seed} - (a) SFT"
            comparisons.append((label, f"{name}_seed{seed}", "full:sft"))
    comparisons += [
        ("(c) mean over the five teachers - (a) SFT", "mean:" + "+".join(arms), "full:sft"),
        ("(c) at the chosen alpha 0.5, the run's teacher - (a) SFT, the run's", "full:meta_sft", "full:sft"),
    ]
    return Study(arms, comparisons, ["full:sft", "full:meta_sft"], "docs/results/spatial-forcing's models (stop 37)")


def untrained_teachers(seeds_work: Path) -> Study:
    arms = {
        f"untrained_{arm}": Arm(untrained_teacher_theta_meta(seeds_work / "start" / f"{arm}.teacher", alpha=1.0))
        for arm in ("teacher_seed1", "teacher_seed2", "small_teacher_seed0")
    }
    comparisons = [(f"(c) from theta_pt + gamma, {arm.replace('_', ' ')} - (a) SFT", arm, "full:sft") for arm in arms]
    comparisons.append(("(c) mean over the three untrained teachers - (a) SFT", "mean:" + "+".join(arms), "full:sft"))
    return Study(arms, comparisons, ["full:sft"], "docs/results/spatial-forcing's models (stop 37)")


# studies made for a folder (the fifth argument): a teacher's, or for untrained_teachers teacher_seeds' work folder
STUDIES_WITH_TEACHER = {
    "teacher_gamma": teacher_gamma,
    "teacher_seeds": teacher_seeds,
    "untrained_teachers": untrained_teachers,
}
VALIDATION = "validation"  # in-domain, on the run's validation placements (its validation_seed)


def main(name: str, full: Path, work: Path, out: Path, teacher: Path | None = None) -> None:
    study, layout = STUDIES_WITH_TEACHER[name](teacher) if teacher else STUDIES[name], RunLayout(full)
    recorded = ReproduceConfig(**read_json(layout.run_file)["config"])
    config = with_chosen_alpha(recorded, read_json(layout.stage_record("select"))["outputs"])
    run = Run(config, layout, "auto")
    steps, every, budgets = max(config.budgets), min(config.budgets), [str(b) for b in config.budgets]

    def train_config(
        folder: Path,
        seed: int,
        init_from: Path,
        strategy: str = "sft",
        finetune: str = "full",
        control: bool = False,
        objective: tuple[str, tuple[tuple[str, object], ...]] | None = None,
    ):
        lr = config.lora_lr if finetune == "lora" else config.downstream_lr
        other = {"auxiliary": objective[0], "auxiliary_args": dict(objective[1])} if objective else {}
        return run.train_config(
            folder, "downstream", steps, lr, seed, init_from, control=control,
            strategy=strategy, finetune=finetune, checkpoint_every=every, schedule="constant", **other,
        )  # fmt: skip

    for method, strategy, control in (("sft", "sft", False), ("aux", "aux", False), ("control_aux", "aux", True)):
        if method not in config.methods:
            continue
        trained = read_json(layout.downstream(method, 0) / "wall.json")["config_hash"]
        if config_hash(train_config(work / "check", 0, layout.pretrained, strategy, control=control)) != trained:
            raise SystemExit(f"the {method} config built here is not the one the full run trained with")
    seeds = list(study.seeds or config.seeds)
    starts: dict[Start, Path] = {}
    for arm_name, arm in study.arms.items():  # arms that share a start share its folder
        path = work / "start" / arm_name
        if arm.start not in starts:
            starts[arm.start] = path if path.exists() else arm.start(layout, path)

    def arm_config(arm_name: str, arm: Arm, seed: int) -> TrainConfig:
        folder = work / arm_name / f"seed{seed}"
        if arm.method:
            budgets = tuple(config.budgets)
            spec = DownstreamRun(folder, arm.method, seed, steps, config.alpha, config.orth_lambda, budgets)
            return downstream_config(run, dataclasses.replace(spec, vector=method_vector(arm.method)))
        return train_config(
            folder, seed, starts[arm.start], arm.strategy, arm.finetune, arm.control, arm.objective
        )  # fmt: skip

    for arm_name, arm in study.arms.items():
        if arm.method:  # built by the run's protocol, so the run's config but for the seed: checked all the same
            trained = read_json(layout.downstream(arm.method, config.seeds[0]) / "wall.json")["config_hash"]
            if config_hash(arm_config(arm_name, arm, config.seeds[0])) != trained:
                raise SystemExit(f"the {arm.method} config built here is not the one the full run trained with")
    plan = {f"{name}/seed{seed}": arm_config(name, arm, seed) for name, arm in study.arms.items() for seed in seeds}
    do_training(run, plan)
    variants, tasks = list(evaluated_variants(config)), split_tasks(config)["downstream"]
    checkpoints, first = {}, {}  # every seed on placements of its own, as the run's (first_episode)
    for trained_run, c in plan.items():
        for b in config.budgets:  # a LoRA checkpoint is an adapter folder, applied to the run's start
            lora_base = c.init_from if c.finetune == "lora" else None
            checkpoints[f"{trained_run}/step{b}"] = (str(checkpoint_folder(Path(c.out_dir), b)), lora_base)
            first[f"{trained_run}/step{b}"] = first_episode(config, c.seed)

    def evaluated(seed: int, looks: list[str]) -> dict:
        """The checkpoints on the placements of `seed`, cached in the work folder under the plan's hash."""
        plan = evaluation_plan(config, checkpoints, seed, looks, first)
        return evaluate_checkpoints(run, plan, work / f"evaluations-{content_hash(plan)}.json")

    mine, theirs = evaluated(config.eval_seed, variants), Evaluations(layout, tuple(variants))
    validation: dict = {}
    if study.validate:
        named = {arm for c in study.comparisons for arm in c[1:]} | set(study.shown)
        for arm in sorted(arm for arm in named if arm.startswith("full:")):
            for s in seeds:
                for b in config.budgets:
                    checkpoints[f"{arm}/seed{s}/step{b}"] = (
                        str(checkpoint_folder(layout.downstream(arm[5:], s), b)),
                        None,
                    )
                    first[f"{arm}/seed{s}/step{b}"] = first_episode(config, s)
        validation = evaluated(config.validation_seed, [config.variant])
        variants = [VALIDATION, *variants]

    def cells(arm: str, budget: str, variant: str) -> np.ndarray:
        if arm.startswith("full:") and variant != VALIDATION:
            return theirs.cells([layout.downstream(arm[5:], s) for s in config.seeds], int(budget), variant, tasks)
        if arm.startswith("mean:"):  # the arms' mean cell by cell: one arm of their pooled starts, paired as each is
            return np.mean([cells(a, budget, variant) for a in arm[5:].split("+")], axis=0)
        if arm.startswith("both:"):  # the run's seeds of the method, then the study's of the arm of the same name
            return np.concatenate([cells(f"full:{arm[5:]}", budget, variant), cells(arm[5:], budget, variant)])
        # the study's evaluations: its arms, and on validation placements the run's methods too
        source, look = (validation, config.variant) if variant == VALIDATION else (mine, variant)
        return success_cells(source, arm, budget, look, seeds, tasks)

    results = {
        "study": name,
        "full_run": str(full),
        "work": str(work),
        "teacher": str(teacher) if teacher else None,
        "alpha_chosen": config.alpha,
        "seeds": seeds,
        "budgets": budgets,
        "variants": variants,
        "success": {
            arm: {v: {b: points(bootstrap_mean(cells(arm, b, v))) for b in budgets} for v in variants}
            for arm in [*study.arms, *study.shown]
        },
        "differences": {
            label: {
                v: {b: points(paired_difference(cells(a, b, v), cells(base, b, v))) for b in budgets} for v in variants
            }
            for label, a, base in study.comparisons
        },
        "gamma_and_tau": gamma_and_tau(layout),
        "own_vectors": own_vectors(study, work, layout),
        "own_teachers": own_teachers(study, work),
        "vector_cosines": vector_cosines(study, work),
        "eval_episodes": config.eval_episodes,
        "trained": all(trained_policy(Path(c.out_dir)).exists() for c in plan.values()),
    }
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / f"{name}.json", results)
    write_text(out / f"{name}.md", markdown(results, study))
    print(markdown(results, study))


def success_cells(
    evaluations: dict, arm: str, budget: str, look: str, seeds: list[int], tasks: list[str]
) -> np.ndarray:
    """An arm's (seeds, tasks) success rates at `budget` steps in the look `look`, from a work folder's evaluations."""
    rows = [evaluations[f"{arm}/seed{s}/step{budget}@{look}"]["tasks"] for s in seeds]
    return np.array([[r[t]["successes"] / r[t]["episodes"] for t in tasks] for r in rows])


def norms_and_cosine(first: Path, second: Path) -> tuple[float, float, float]:
    """|first|, |second| and their cosine over every tensor of two vectors with the same tensors, in float64."""
    a, b = open_vector(first), open_vector(second)
    aa = bb = ab = 0.0
    for name in a:
        x, y = a[name].double(), b[name].double()
        aa, bb, ab = aa + float((x * x).sum()), bb + float((y * y).sum()), ab + float((x * y).sum())
    a.close()
    b.close()
    return round(aa**0.5, 4), round(bb**0.5, 4), round(ab / (aa * bb) ** 0.5, 4)


def own_vectors(study: Study, work: Path, layout: RunLayout) -> dict[str, dict[str, float]]:
    """|v| and its cosine with the run's gamma, of each vector the study's starts extracted."""
    found = {}
    for arm in study.arms:
        vector = work / "start" / f"{arm}.gamma"
        if vector.exists():
            norm, _, cosine = norms_and_cosine(vector, layout.gamma)
            found[arm] = {"norm": norm, "cosine_with_gamma": cosine}
    return found


def vector_cosines(study: Study, work: Path) -> dict[str, dict[str, float]]:
    """The cosine of every pair of vectors the study's starts extracted (an empty table if fewer than two)."""
    vectors = [arm for arm in study.arms if (work / "start" / f"{arm}.gamma").exists()]
    if len(vectors) < 2:
        return {}
    path = {arm: work / "start" / f"{arm}.gamma" for arm in vectors}
    return {a: {b: norms_and_cosine(path[a], path[b])[2] for b in vectors if b != a} for a in vectors}


def own_teachers(study: Study, work: Path) -> dict[str, dict]:
    """The pretraining figures (frames, validation errors, probes) of the teacher each study start aligned with."""
    found = {}
    for arm in study.arms:
        teacher = work / "start" / f"{arm}.teacher"
        if teacher.exists():
            record = read_json(teacher / RECORD_NAME)
            found[arm] = record if "untrained_copy_of" in record else pretraining_summary(teacher)
    return found


def teacher_sentence(arm: str, teacher: dict) -> str:
    if "untrained_copy_of" in teacher:
        return (
            f" The teacher of {arm}: {teacher['untrained_copy_of']} as its pretraining started it (the share of its "
            "normalized features' variance that object and goal positions explain beyond patch and hand position: "
            f"{teacher['probe']['share']:.3f})."
        )
    return f" The teacher of {arm}: {describe_teacher(teacher)}"


def gamma_and_tau(layout: RunLayout) -> dict[str, float]:
    """|gamma|, |tau| and their cosine."""
    return dict(zip(("gamma_norm", "tau_norm", "cosine"), norms_and_cosine(layout.gamma, layout.tau), strict=True))


def fmt(triple: list[float]) -> str:
    return f"{triple[0]:+.1f} [{triple[1]:+.0f}, {triple[2]:+.0f}]"


def markdown(results: dict, study: Study) -> str:
    budgets, name = results["budgets"], results["study"]
    teacher = f" {results['teacher']}" if results.get("teacher") else ""
    about = next(part for part in __doc__.split("\n\n") if part.startswith(f"{name}:"))
    lines = [
        f"# Diagnostic `{name}` on {study.run}",
        "",
        about.replace("\n", " "),
        "",
        f"Command: `PYTHONPATH=src .venv/bin/python docs/results/diagnostics/run.py {name} "
        f"{results['full_run']} {results['work']} docs/results/diagnostics{teacher}`. Seeds "
        f"{results['seeds']}, {results['eval_episodes']} test episodes per (seed, task, checkpoint), the run's test "
        "placements. The run's vectors: |gamma| {gamma_norm}, |tau| {tau_norm}, cosine {cosine}.".format(
            **results["gamma_and_tau"]
        )
        + "".join(
            f" The vector {arm}'s start extracted: |v| {v['norm']}, cosine with gamma {v['cosine_with_gamma']}."
            for arm, v in results.get("own_vectors", {}).items()
        )
        + "".join(teacher_sentence(arm, t) for arm, t in results["own_teachers"].items()),
        "",
    ]
    cosines = results["vector_cosines"]
    if cosines:
        lines += ["Cosines of the vectors the starts extracted:", "", "| | " + " | ".join(cosines) + " |"]
        lines.append("|---" * (len(cosines) + 1) + "|")
        for a, row in cosines.items():
            lines.append(f"| {a} | " + " | ".join(f"{row[b]:.3f}" if b in row else "1" for b in cosines) + " |")
        lines.append("")
    header = " | ".join(f"{b} steps" for b in budgets)
    for variant in results["variants"]:
        title = {NEW_ENV: "new environment", VALIDATION: "validation placements, in-domain (choose here)"}.get(
            variant, f"in-domain ({variant})"
        )
        lines += [f"## {title[0].upper()}{title[1:]}", "", "Paired differences, points, 95% bootstrap over seeds:", ""]
        lines += [f"| comparison | {header} |", "|---|" + "---|" * len(budgets)]
        for label, by_variant in results["differences"].items():
            lines.append(f"| {label} | " + " | ".join(fmt(by_variant[variant][b]) for b in budgets) + " |")
        lines += ["", "Success (mean over seeds and tasks, 95% bootstrap over seeds):", ""]
        lines += [f"| start | {header} |", "|---|" + "---|" * len(budgets)]
        for arm, by_variant in results["success"].items():
            row = (by_variant[variant][b] for b in budgets)
            lines.append(f"| {arm} | " + " | ".join(f"{c[0]:.0f}% [{c[1]:.0f}, {c[2]:.0f}]" for c in row) + " |")
        lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    with_teacher = len(sys.argv) == 6 and sys.argv[1] in STUDIES_WITH_TEACHER
    if not with_teacher and (len(sys.argv) != 5 or sys.argv[1] not in STUDIES):
        raise SystemExit(__doc__)
    main(sys.argv[1], *(Path(a).resolve() for a in sys.argv[2:]))
