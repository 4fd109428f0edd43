"""The factories the training engine imports to train on the embedded benchmark.

    strategy: aux
    policy: capvector.bench.recipe:policy
    policy_args: {dataset: runs/demos/extract}        # normalization from this dataset (new policies only)
    init_from: runs/pretrain/policy                   # or null: a fresh policy
    dataset: capvector.bench.recipe:dataset
    dataset_args: {root: runs/demos/extract}
    auxiliary: capvector.bench.recipe:spatial
    auxiliary_args: {dataset: runs/demos/extract, weight: 0.5}
    # frozen teacher: auxiliary: capvector.bench.recipe:teacher_alignment, auxiliary_args: {teacher: runs/teacher}

A fresh policy takes its normalization bounds (q01/q99) and image size from the dataset; a loaded one keeps
those in its config.json, so every finetune of theta_pt normalizes exactly as theta_pt did. `load_trained(path)`
opens what the engine wrote (a policy folder, or a LoRA adapter folder applied to its base) for evaluation;
`evaluate_success` is the engine's evaluation hook (success rates every eval_every steps):

    eval: capvector.bench.recipe:evaluate_success
    eval_args: {tasks: downstream, episodes: 10}
    eval_every: 500
"""

from __future__ import annotations

import copy
import functools
from pathlib import Path
from typing import Any

from torch import nn

from capvector.bench.env.dataset import CAPVECTOR_META, DemoDataset, capvector_meta, image_size, open_meta
from capvector.bench.env.evaluation import evaluate
from capvector.bench.env.sim import MAX_EPISODE_STEPS
from capvector.bench.objectives.alignment import TeacherAlignment
from capvector.bench.objectives.localization import LocalizationObjective
from capvector.bench.objectives.privileged import PrivilegedObjective
from capvector.bench.objectives.spatial import SpatialObjective
from capvector.bench.policy.configuration_policy import PolicyConfig
from capvector.bench.policy.modeling_policy import CONFIG_NAME, TOKENIZER_NAME, Policy, check_tokenizer
from capvector.errors import CapvectorError
from capvector.params.checkpoints import ADAPTER_CONFIG, open_checkpoint


def policy(init_from: str | None, dataset: str | None = None, privileged_dim: int = 0, **config: object) -> Policy:
    """The policy in `init_from`, or a new one normalized by `dataset`'s statistics, with PolicyConfig fields
    `config`. `privileged_dim` makes it an oracle, told the object and goal positions (normalized by `dataset`'s
    statistics); with `init_from`, through a new projection added to the pretrained policy."""
    if init_from is not None:
        if config:
            raise CapvectorError(
                f"policy_args {sorted(config)} shape a new policy, but init_from {init_from} is loaded with its own "
                "config.json; drop them (only privileged_dim applies: it makes it an oracle) or set init_from to null"
            )
        if privileged_dim and dataset is None:
            raise CapvectorError(
                "policy_args.privileged_dim makes init_from an oracle, which needs policy_args.dataset: the "
                "demonstration folder whose meta/stats.json normalizes the positions"
            )
        pretrained = Policy.from_pretrained(init_from)
        return pretrained.as_oracle(open_meta(str(dataset)).stats, privileged_dim) if privileged_dim else pretrained
    if dataset is None:
        raise CapvectorError(
            "a new benchmark policy needs policy_args.dataset: the demonstration folder whose "
            "meta/stats.json gives its normalization"
        )
    meta = open_meta(dataset)
    config.setdefault("image_size", image_size(meta))
    return Policy(PolicyConfig.from_dataset_stats(meta.stats, privileged_dim=privileged_dim, **config))


def dataset(root: str, chunk_size: int = 8, depth: bool = True) -> DemoDataset:
    """The demonstrations in `root`; depth maps only matter to the spatial objective (depth=False saves memory)."""
    return DemoDataset(root, chunk_size=chunk_size, depth=depth)


def spatial(dataset: str, fovy: dict[str, float] | None = None, **args: Any) -> SpatialObjective:
    """The Spatial Forcing analog; the cameras' vertical fields of view (degrees) are `fovy`, or read from
    `dataset`'s capvector block (written by `capvector demos`)."""
    if fovy is None:
        block = capvector_meta(dataset)
        if block is None:
            raise CapvectorError(
                f"the spatial objective needs the cameras' fields of view: {dataset} has no {CAPVECTOR_META} "
                "(another tool wrote it); pass auxiliary_args.fovy, e.g. {scene: 40.0, wrist: 90.0}"
            )
        fovy = {camera: facts["fovy"] for camera, facts in block["cameras"].items()}
    return SpatialObjective(fovy=fovy, **args)


def load_trained(path: str | Path, device: str = "cpu", base: str | Path | None = None) -> Policy:
    """A trained policy ready for evaluation: a policy folder, or a LoRA adapter folder merged into `base` (default:
    the folder its adapter_config.json names). `functools.partial(load_trained, path)` is a picklable factory."""
    path = Path(path)
    if not (path / ADAPTER_CONFIG).is_file():
        return Policy.from_pretrained(path, device).eval()
    weights = open_checkpoint(path, base=base)
    assert weights.base is not None  # an adapter folder opens with its base
    try:
        config = PolicyConfig.from_json(weights.base.root / CONFIG_NAME)
        check_tokenizer(weights.base.root / TOKENIZER_NAME, config)
        policy = Policy(config)
        policy.load_state_dict({name: weights[name] for name in weights})
    finally:
        weights.close()
    return policy.to(device).eval()


def privileged(
    layer: str = "vision", weight: float = 0.5, scale: float = 0.1, tokens: str = "visual"
) -> PrivilegedObjective:
    """The positive control: visual tokens (or, `tokens` "queries", the action query tokens at a trunk `layer`; ""
    is the policy's hook_layer) regress the object's and the goal's positions relative to the hand."""
    return PrivilegedObjective(layer=layer, weight=weight, scale=scale, tokens=tokens)


def localization(layer: str = "vision", weight: float = 0.5) -> LocalizationObjective:
    """The positive control that can localize: each visual patch learns where the object and goal appear relative
    to it in its camera's image."""
    return LocalizationObjective(layer=layer, weight=weight)


def teacher_alignment(teacher: str, layer: str = "vision", weight: float = 0.5) -> TeacherAlignment:
    """The Spatial Forcing analog with a frozen teacher: `teacher` is a folder pretrain_teacher wrote (it must fit
    the policy's cameras, image size and patch grid)."""
    return TeacherAlignment(teacher, layer=layer, weight=weight)


def plain_copy(policy: nn.Module) -> Policy:
    """The policy being trained as a plain Policy on the CPU (evaluation workers are CPU processes), without an
    auxiliary objective's hooks; a LoRA run's PEFT model with its adapters merged in."""
    trained: Any = policy
    if hasattr(trained, "merge_and_unload"):
        trained = copy.deepcopy(trained).merge_and_unload()
    snapshot = Policy(trained.config)
    snapshot.load_state_dict({name: value.detach().cpu() for name, value in trained.state_dict().items()})
    return snapshot.eval()


def evaluate_success(
    policy: nn.Module,
    tasks: str | list[str] = "downstream",
    episodes: int = 5,
    max_steps: int = MAX_EPISODE_STEPS,
    workers: int = 1,
    seed: int = 0,
    variant: str = "default",
    placement: str = "default",
) -> dict[str, float]:
    """The training engine's evaluation hook (TrainConfig.eval): closed-loop success of the policy being trained,
    "success" (the mean over tasks) and "success/<task>", on the held-out evaluation placements (see
    capvector.bench.env.evaluation.evaluate for the arguments)."""
    snapshot = plain_copy(policy)
    result = evaluate(
        functools.partial(copy.deepcopy, snapshot),
        tasks,
        episodes=episodes,
        seed=seed,
        workers=workers,
        variant=variant,
        image_size=snapshot.config.image_size,
        placement=placement,
        max_steps=max_steps,
    )
    return {"success": result.success_rate} | {f"success/{task.task}": task.success_rate for task in result.tasks}
