"""The training run's configuration: one dataclass, read from YAML or TOML, with `key=value` overrides.

The three runs of the method (sft, aux, capvector) share one config and differ only in `strategy`, so that
the extraction runs see the same data, seed, order, schedule and batch.
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import json
import tomllib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from capvector.training import orthogonal
from capvector.errors import CapvectorError


@dataclass
class TrainConfig:
    # What to train. Import strings "pkg.module:factory": policy = factory(init_from, **policy_args),
    # dataset = factory(**dataset_args), auxiliary = factory(**auxiliary_args) (built for strategy "aux" only).
    strategy: str = "sft"
    policy: str = ""
    policy_args: dict = field(default_factory=dict)
    init_from: str | None = None  # a policy folder to start from; None: the factory's own initialization
    dataset: str = ""
    dataset_args: dict = field(default_factory=dict)
    auxiliary: str = ""
    auxiliary_args: dict = field(default_factory=dict)
    out_dir: str = "runs/train"

    # strategy "capvector": loss = policy losses + orth_lambda * L_orth(theta - theta_meta, gamma), with
    # theta_meta = the weights of init_from (the merged checkpoint) and gamma read from `vector`.
    vector: str | None = None
    orth_lambda: float = 10.0  # 0 with orth_hard: the hard variant alone
    orth_reduction: str = "normalized"  # per-tensor projections combined as in capvector.training.orthogonal
    orth_hard: bool = False  # also project the update off gamma after every optimizer step (exact)
    lora_form: str = "olora"  # with finetune "lora": "olora" (A against gamma's input subspace) or "exact"
    orth_rank: int = 8  # the size of gamma's input subspace for lora_form "olora"

    # Finetuning: all weights, or LoRA adapters through PEFT (rank 32 as OpenVLA-OFT).
    finetune: str = "full"
    lora_rank: int = 32
    lora_alpha: float = 16.0
    lora_dropout: float = 0.0
    lora_targets: list = field(default_factory=list)  # glob patterns over module names; empty: every nn.Linear

    # Optimization: AdamW, linear warmup then cosine decay to min_lr (or constant), gradient clipping.
    steps: int = 1000
    batch_size: int = 32  # global: split evenly across processes
    lr: float = 1e-4
    min_lr: float = 1e-5
    warmup_steps: int = 0
    schedule: str = "cosine"
    weight_decay: float = 0.0  # decay pulls weights toward zero, not toward the starting point
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0  # 0 disables
    seed: int = 0
    device: str = "auto"  # "auto" picks CUDA when present; or "cpu", "cuda", "cuda:1"
    bf16: bool = True  # bf16 autocast of the forward pass, on CUDA only

    # Data: datasets up to this size are read once into memory as one table (no DataLoader); larger ones
    # go through a DataLoader with num_workers processes.
    cache_dataset_mb: int = 2048
    num_workers: int = 2

    # Checkpoints and logs (none of these change the result, so a run may resume with other values).
    checkpoint_every: int = 500  # 0: only the final policy
    keep_checkpoints: int = 2  # the most recent ones; 0 keeps all
    resume: bool = False
    log_every: int = 10
    progress: bool = True
    tensorboard: bool = True  # when the tensorboard package is installed
    time_parts: bool = True  # per-part step times; on CUDA each part ends with a device sync


CHOICES = {
    "strategy": ("sft", "aux", "capvector"),
    "finetune": ("full", "lora"),
    "schedule": ("cosine", "constant"),
    "orth_reduction": orthogonal.REDUCTIONS,
    "lora_form": orthogonal.LORA_FORMS,
}
# Fields that change nothing in the trained weights: a run may be resumed with other values for them.
BOOKKEEPING = frozenset(
    {
        "out_dir",
        "resume",
        "checkpoint_every",
        "keep_checkpoints",
        "log_every",
        "progress",
        "tensorboard",
        "time_parts",
        "num_workers",
        "cache_dataset_mb",
    }
)


def _check_type(name: str, value: Any, hint: Any) -> Any:
    """The value converted to the field's type (an int where a float is expected), or a CapvectorError."""
    options = typing.get_args(hint) if isinstance(hint, types.UnionType) else (hint,)
    if value is None and type(None) in options:
        return None
    for option in options:
        if option is float and isinstance(value, int) and not isinstance(value, bool):
            return float(value)
        if option is float and isinstance(value, str):  # YAML 1.1 reads 1e-4 (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        if option is int and isinstance(value, bool):
            continue
        if option is list and isinstance(value, list) and all(isinstance(item, str) for item in value):
            return value
        if option is not list and option is not type(None) and isinstance(value, option):
            return value
    expected = " or ".join(
        "null" if o is type(None) else "list of strings" if o is list else o.__name__ for o in options
    )
    raise CapvectorError(f"config field '{name}': expected {expected}, got {value!r} ({type(value).__name__})")


def config_from_dict(values: dict[str, Any], origin: str = "config") -> TrainConfig:
    hints = typing.get_type_hints(TrainConfig)
    checked = {}
    for name, value in values.items():
        if name not in hints:
            close = difflib.get_close_matches(name, hints, n=1)
            hint = f"did you mean '{close[0]}'? " if close else ""
            raise CapvectorError(f"{origin}: unknown field '{name}'; {hint}valid fields: {', '.join(hints)}")
        checked[name] = _check_type(name, value, hints[name])
        if name in CHOICES and checked[name] not in CHOICES[name]:
            raise CapvectorError(f"{origin}: field '{name}' is {value!r}; choose one of: {', '.join(CHOICES[name])}")
    return TrainConfig(**checked)


def parse_override(text: str) -> tuple[list[str], Any]:
    """'steps=2000' -> (['steps'], 2000); 'policy_args.dim=64' -> (['policy_args', 'dim'], 64). Values are YAML."""
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise CapvectorError(f"override {text!r}: write it as key=value, e.g. steps=2000")
    return key.strip().split("."), yaml.safe_load(raw) if raw.strip() else ""


def load_config(path: str | Path | None = None, overrides: list[str] = ()) -> TrainConfig:
    """A config from a YAML (.yaml/.yml) or TOML (.toml) file (or the defaults), then `key=value` overrides."""
    values: dict[str, Any] = {}
    origin = "config"
    if path is not None:
        path, origin = Path(path), str(path)
        if not path.is_file():
            raise CapvectorError(f"config file {path} does not exist")
        text = path.read_text()
        try:
            values = tomllib.loads(text) if path.suffix == ".toml" else yaml.safe_load(text) or {}
        except (tomllib.TOMLDecodeError, yaml.YAMLError) as error:
            raise CapvectorError(f"config file {path} cannot be parsed: {error}") from error
        if not isinstance(values, dict):
            raise CapvectorError(f"config file {path}: expected a mapping of field: value at the top level")
    for text in overrides:
        keys, value = parse_override(text)
        target = values
        for key in keys[:-1]:
            target = target.setdefault(key, {})
            if not isinstance(target, dict):
                raise CapvectorError(f"override {text!r}: '{key}' is not a mapping")
        target[keys[-1]] = value
    return config_from_dict(values, origin)


def save_config(config: TrainConfig, path: Path) -> None:
    tmp = path.with_name(f".tmp-{path.name}")
    tmp.write_text(yaml.safe_dump(dataclasses.asdict(config), sort_keys=False))
    tmp.replace(path)


def result_fields(config: TrainConfig) -> dict[str, Any]:
    """The fields that determine the trained weights (everything but bookkeeping)."""
    return {k: v for k, v in dataclasses.asdict(config).items() if k not in BOOKKEEPING}


def config_hash(config: TrainConfig) -> str:
    return hashlib.sha256(json.dumps(result_fields(config), sort_keys=True).encode()).hexdigest()[:16]
