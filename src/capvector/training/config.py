"""The training run's configuration: one dataclass, read from YAML or TOML, with `key=value` overrides.

The three runs of the method (sft, aux, capvector) share one config and differ only in `strategy`, so that
the extraction runs see the same data, seed, order, schedule and batch. Every value is checked when the config
is read (type, choice, range), and again when `train` gets a config built in Python, so a bad value is named
before anything is built or written.
"""

from __future__ import annotations

import ast
import dataclasses
import difflib
import inspect
import io
import json
import math
import textwrap
import tokenize
import types
import typing
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, cast

import tomllib
import torch
import yaml

from capvector.errors import CapvectorError
from capvector.files import content_hash, write_text
from capvector.training.orthogonal import LoraForm, Reduction

Strategy = Literal["sft", "aux", "capvector"]
Finetune = Literal["full", "lora"]
Schedule = Literal["cosine", "constant"]
Distributed = Literal["ddp", "fsdp"]


@dataclass
class TrainConfig:
    # Each field is described by its comment, on its line or on the lines right above it; a comment after a blank
    # line heads a section. `capvector train --help` prints them (field_docs), and a test requires one per field.

    # What to train. Import strings "pkg.module:factory": policy = factory(init_from, **policy_args),
    # dataset = factory(**dataset_args), auxiliary = factory(**auxiliary_args) (built for strategy "aux" only).
    strategy: Strategy = "sft"  # sft: plain finetuning; aux: plus the auxiliary objective; capvector: plus L_orth
    policy: str = ""  # the policy factory; it returns a module whose forward(batch) returns a dict of losses
    policy_args: dict[str, Any] = field(default_factory=dict)  # keyword arguments of the policy factory
    init_from: str | None = None  # a policy folder to start from; None: the factory's own initialization
    dataset: str = ""  # the dataset factory; it returns a map-style torch Dataset of dict samples
    dataset_args: dict[str, Any] = field(default_factory=dict)  # keyword arguments of the dataset factory
    auxiliary: str = ""  # the auxiliary objective's factory (a capvector.training.auxiliary.AuxiliaryObjective)
    auxiliary_args: dict[str, Any] = field(default_factory=dict)  # keyword arguments of the auxiliary factory
    out_dir: str = "runs/train"  # the run's folder: config.yaml, metrics.jsonl, checkpoints/, policy/

    # strategy "capvector": loss = policy losses + orth_lambda * L_orth(theta - theta_meta, gamma), with
    # theta_meta = the weights of init_from (the merged checkpoint) and gamma read from `vector`.
    vector: str | None = None  # the capability vector's folder (what `capvector extract` wrote)
    orth_lambda: float = 10.0  # the weight of L_orth; 0 with orth_hard: the hard variant alone
    orth_reduction: Reduction = "normalized"  # per-tensor projections combined as in capvector.training.orthogonal
    orth_hard: bool = False  # also project the update off gamma after every optimizer step (exact)
    lora_form: LoraForm = "olora"  # with finetune "lora": "olora" (gamma's input subspace) or "exact"
    orth_rank: int = 8  # the size of gamma's input subspace for lora_form "olora"
    # init_from must carry the merge record of `capvector merge` naming `vector` (theta_pt + alpha * gamma for
    # this gamma); false for a theta_meta made some other way
    check_merge: bool = True

    # Finetuning: all weights, or LoRA adapters through PEFT (rank 32 as OpenVLA-OFT).
    finetune: Finetune = "full"  # full: every weight; lora: PEFT adapters on init_from (pip install capvector[lora])
    lora_rank: int = 32  # the adapters' rank r
    lora_alpha: float = 16.0  # the adapters' scale is lora_alpha / lora_rank
    lora_dropout: float = 0.0  # dropout on the adapters' input
    lora_targets: list[str] = field(default_factory=list)  # glob patterns over module names; empty: every nn.Linear

    # Optimization: AdamW, linear warmup then cosine decay to min_lr (or constant), gradient clipping.
    steps: int = 1000  # optimizer steps
    batch_size: int = 32  # global: split evenly across processes (and their grad_accum_steps micro-batches)
    lr: float = 1e-4  # the peak learning rate
    min_lr: float = 1e-5  # the learning rate at the last step of the cosine schedule
    warmup_steps: int = 0  # steps of linear warmup from lr / warmup_steps to lr
    schedule: Schedule = "cosine"  # after warmup: cosine decay to min_lr, or constant lr
    weight_decay: float = 0.0  # decay pulls weights toward zero, not toward the starting point
    beta1: float = 0.9  # AdamW's first-moment decay
    beta2: float = 0.95  # AdamW's second-moment decay
    grad_clip: float = 1.0  # the largest gradient norm; 0 disables clipping
    seed: int = 0  # the batch order, the initialization and dropout; sft and aux with one seed see the same batches
    device: str = "auto"  # "auto" picks CUDA when present; or "cpu", "cuda", "cuda:1"
    bf16: bool = True  # bf16 autocast of the forward pass, on CUDA only

    # Memory (capvector.training.memory estimates it). Under torchrun, "ddp" keeps a whole copy of the model,
    # its gradients and optimizer state in every process; "fsdp" (FSDP2) shards them, and gamma, on dim 0.
    distributed: Distributed = "ddp"  # under torchrun: "ddp" (a whole copy per process) or "fsdp" (sharded)
    grad_accum_steps: int = 1  # micro-batches per optimizer step, each batch_size / (processes * this) samples
    activation_checkpointing: bool = False  # recompute each block's activations in backward instead of keeping them
    # glob patterns over module names: the policy's blocks (FSDP's units, the checkpointed modules);
    # empty: every element of every nn.ModuleList (capvector.training.blocks)
    blocks: list[str] = field(default_factory=list)

    # Data: datasets up to this size are read once into memory as one table (no DataLoader); larger ones
    # go through a DataLoader with num_workers processes.
    cache_dataset_mb: int = 2048  # the largest dataset (MB) read into memory
    num_workers: int = 2  # DataLoader processes for larger datasets

    # Checkpoints, logs and evaluation (none of these change the trained weights, so a run may resume with other
    # values).
    checkpoint_every: int = 500  # 0: only the final policy
    keep_checkpoints: int = 2  # the most recent ones (at least 2: one to fall back to if the last is damaged); 0: all
    resume: bool = False  # continue from out_dir's newest intact checkpoint
    log_every: int = 10  # steps per line of metrics.jsonl (and per progress line when not on a terminal)
    progress: bool = True  # a progress bar on a terminal, else a line every log_every steps (on stderr)
    tensorboard: bool = True  # also log to out_dir/tensorboard, when the tensorboard package is installed
    # also log to Weights & Biases, offline (out_dir/wandb; `wandb sync` uploads it later); pip install
    # capvector[wandb]
    wandb: bool = False
    wandb_project: str = "capvector"  # the W&B project the run is filed under when synced
    time_parts: bool = True  # per-part step times; on CUDA each part ends with a device sync
    # an evaluation hook "pkg.module:function", called as function(policy, **eval_args) on the first process with
    # the policy in eval mode; it returns numbers by name, logged as eval/<name> (the benchmark's:
    # capvector.bench.recipe:evaluate_success)
    eval: str = ""
    eval_args: dict[str, Any] = field(default_factory=dict)  # keyword arguments of the evaluation hook
    eval_every: int = 0  # run the evaluation hook after every eval_every steps; 0: never


# Fields that change nothing in the trained weights: a run may be resumed with other values for them.
CONFIG_FILE = "config.yaml"  # the resolved config in a run folder
BOOKKEEPING = frozenset(
    {
        "out_dir",
        "resume",
        "check_merge",
        "checkpoint_every",
        "keep_checkpoints",
        "log_every",
        "progress",
        "tensorboard",
        "wandb",
        "wandb_project",
        "time_parts",
        "eval",
        "eval_args",
        "eval_every",
        "num_workers",
        "cache_dataset_mb",
        "activation_checkpointing",  # recomputes the same values (tests/test_accumulation.py)
    }
)


def field_docs() -> list[tuple[str, str, str]]:
    """(section, field, description) for each TrainConfig field, in order, read from the class's comments: a
    field's own comment is on its line or on the comment lines right above it; a comment block after a blank line
    is the section of the fields below it."""
    source = textwrap.dedent(inspect.getsource(TrainConfig))
    lines = source.splitlines()
    comments = {
        token.start[0]: token.string.lstrip("#").strip()
        for token in tokenize.generate_tokens(io.StringIO(source).readline)
        if token.type == tokenize.COMMENT
    }
    body = cast(ast.ClassDef, ast.parse(source).body[0]).body
    docs, section = [], ""
    for node in body:
        if not isinstance(node, ast.AnnAssign) or not isinstance(node.target, ast.Name):
            continue
        above: list[str] = []
        row = node.lineno - 1  # 1-based line numbers: lines[row - 1] is the line above the field
        while row >= 1 and row in comments and lines[row - 1].lstrip().startswith("#"):
            above.insert(0, comments[row])
            row -= 1
        if row >= 1 and not lines[row - 1].strip():  # a block after a blank line: a new section
            section, above = " ".join(above) or section, []
        own = " ".join(above + ([comments[node.end_lineno]] if node.end_lineno in comments else []))
        docs.append((section, node.target.id, own))
    return docs


def kind_name(hint: Any) -> str:
    """A field's type as `train --help` shows it: its choices, or its type(s)."""
    origin = typing.get_origin(hint)
    if origin is Literal:
        return " | ".join(typing.get_args(hint))
    if origin in (types.UnionType, typing.Union):
        return " | ".join(kind_name(option) for option in typing.get_args(hint))
    return "mapping" if origin is dict else type_name(hint)


def describe_fields() -> str:
    """Every TrainConfig field with its default and meaning, by section (`capvector train --help`)."""
    hints = typing.get_type_hints(TrainConfig)
    defaults = TrainConfig()
    out = ["config fields (keys of the YAML/TOML file, or --set KEY=VALUE; values are YAML):"]
    previous = None
    for section, name, doc in field_docs():
        if section != previous:
            out += ["", *textwrap.wrap(section, 116)]
            previous = section
        out.append(f"  {name}: {json.dumps(getattr(defaults, name))}    ({kind_name(hints[name])})")
        out += textwrap.wrap(doc, 116, initial_indent="      ", subsequent_indent="      ")
    return "\n".join(out)


def at_least(low: float) -> tuple[Callable[[Any], bool], str]:
    return (lambda v: v >= low), f"at least {low:g}"


def above(low: float) -> tuple[Callable[[Any], bool], str]:
    return (lambda v: v > low), f"above {low:g}"


def fraction() -> tuple[Callable[[Any], bool], str]:
    return (lambda v: 0 <= v < 1), "in [0, 1)"


# The allowed range of each numeric field: (test, what it says).
RANGES: dict[str, tuple[Callable[[Any], bool], str]] = {
    "orth_lambda": at_least(0),
    "orth_rank": at_least(1),
    "lora_rank": at_least(1),
    "lora_alpha": above(0),
    "lora_dropout": fraction(),
    "steps": at_least(1),
    "grad_accum_steps": at_least(1),
    "batch_size": at_least(1),
    "lr": above(0),
    "min_lr": at_least(0),
    "warmup_steps": at_least(0),
    "weight_decay": at_least(0),
    "beta1": fraction(),
    "beta2": fraction(),
    "grad_clip": at_least(0),
    "seed": ((lambda v: 0 <= v < 2**32), "in [0, 2**32)"),
    "cache_dataset_mb": at_least(0),
    "num_workers": at_least(0),
    "checkpoint_every": at_least(0),
    "keep_checkpoints": ((lambda v: v == 0 or v >= 2), "0 (keep all) or at least 2 (one to fall back to)"),
    "log_every": at_least(1),
    "eval_every": at_least(0),
}


def type_name(hint: Any) -> str:
    if hint is type(None):
        return "null"
    origin = typing.get_origin(hint)
    if origin is list:
        return "list of strings"
    if origin is dict:
        return "a mapping of names to plain values (numbers, strings, lists, mappings)"
    return str(getattr(hint, "__name__", hint))


def check_type(name: str, value: Any, hint: Any) -> Any:
    """The value as the field's type (an int or a YAML 1.1 string like 1e-4 where a float is expected), or a
    CapvectorError naming the field."""
    origin = typing.get_origin(hint)
    if origin is Literal:
        if isinstance(value, str) and value in typing.get_args(hint):
            return value
        choices = ", ".join(typing.get_args(hint))
        raise CapvectorError(f"field '{name}' is {value!r}; choose one of: {choices}")
    options = typing.get_args(hint) if origin in (types.UnionType, typing.Union) else (hint,)
    for option in options:
        converted = convert(value, option)
        if converted is not None or (value is None and option is type(None)):
            return converted
    expected = " or ".join(type_name(option) for option in options)
    raise CapvectorError(f"field '{name}': expected {expected}, got {value!r} ({type(value).__name__})")


def convert(value: Any, option: Any) -> Any:
    """The value as type `option`, or None when it is not one."""
    if option is bool or option is int:
        return value if type(value) is option else None  # a bool is no int here, nor an int a bool
    if option is float:
        if isinstance(value, str):  # YAML 1.1 reads 1e-4 (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                return None
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            return None
        try:
            return float(value)
        except OverflowError:  # an int beyond any float
            return None
    if option is str:
        return value if isinstance(value, str) and "\0" not in value else None  # no path holds a NUL byte
    if typing.get_origin(option) is list:
        return list(value) if isinstance(value, list) and all(isinstance(v, str) for v in value) else None
    if typing.get_origin(option) is dict:
        return (
            dict(value) if isinstance(value, dict) and all(isinstance(k, str) for k in value) and plain(value) else None
        )
    return None


def plain(value: Any) -> bool:
    """Whether a value is JSON data (what the config hash and the checkpoints record): no dates, bytes, sets,
    objects or self-references."""
    try:
        json.dumps(value)
    except (TypeError, ValueError, RecursionError):
        return False
    return True


def check_values(config: TrainConfig) -> None:
    """Ranges, finiteness and the relations between fields."""
    for name, value in dataclasses.asdict(config).items():
        if isinstance(value, float) and not math.isfinite(value):
            raise CapvectorError(f"field '{name}' is {value}; give a finite number")
        if name in RANGES and not RANGES[name][0](value):
            raise CapvectorError(f"field '{name}' is {value!r}; it must be {RANGES[name][1]}")
    if config.schedule == "cosine" and config.min_lr > config.lr:
        raise CapvectorError(
            f"field 'min_lr' is {config.min_lr:g}, above lr {config.lr:g}: the cosine schedule decays from lr to "
            "min_lr; set min_lr <= lr"
        )
    if config.device != "auto":
        try:
            kind = torch.device(config.device).type
        except RuntimeError:
            kind = ""
        if kind not in ("cpu", "cuda"):
            raise CapvectorError(f"field 'device' is {config.device!r}; use 'auto', 'cpu', 'cuda' or 'cuda:N'")


def config_from_dict(values: dict[Any, Any], origin: str = "config") -> TrainConfig:
    """A checked config from field values (as read from a file); errors start with `origin`."""
    hints = typing.get_type_hints(TrainConfig)
    typed = {}
    try:
        for name, value in values.items():
            if name not in hints:
                close = difflib.get_close_matches(str(name), hints, n=1)
                hint = f"did you mean '{close[0]}'? " if close else ""
                raise CapvectorError(f"unknown field {name!r}; {hint}valid fields: {', '.join(hints)}")
            typed[name] = check_type(name, value, hints[name])
        config = TrainConfig(**typed)
        check_values(config)
    except CapvectorError as error:
        raise CapvectorError(f"{origin}: {error}") from None
    return config


def checked(config: TrainConfig) -> TrainConfig:
    """`config` (built in Python, so never checked) put through the same checks as a config file."""
    return config_from_dict({f.name: getattr(config, f.name) for f in dataclasses.fields(config)})


def parse_override(text: str) -> tuple[list[str], Any]:
    """'steps=2000' -> (['steps'], 2000); 'policy_args.dim=64' -> (['policy_args', 'dim'], 64). Values are YAML."""
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise CapvectorError(f"override {text!r}: write it as key=value, e.g. steps=2000")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except (yaml.YAMLError, RecursionError) as error:
        raise CapvectorError(f"override {text!r}: the value is not valid YAML ({one_line(error)}); quote it") from None
    return key.strip().split("."), value


def one_line(error: Exception) -> str:
    """A parser's message (YAML's spans lines, with a marker under the column) as one line."""
    return " ".join(str(error).split())


def read_file(path: Path) -> dict[Any, Any]:
    """A config file's field values."""
    try:
        text = path.read_bytes().decode()
    except FileNotFoundError:
        raise CapvectorError(f"config file {path} does not exist") from None
    except OSError as error:  # a folder, no permission
        raise CapvectorError(f"config file {path} cannot be read: {error.strerror}") from None
    except UnicodeDecodeError:
        raise CapvectorError(f"config file {path} is not UTF-8 text; write the config as YAML or TOML") from None
    try:
        values = tomllib.loads(text) if path.suffix == ".toml" else yaml.safe_load(text)
    except (tomllib.TOMLDecodeError, yaml.YAMLError) as error:
        raise CapvectorError(f"config file {path} cannot be parsed: {one_line(error)}") from None
    except RecursionError:
        raise CapvectorError(f"config file {path} cannot be parsed: it is nested too deeply") from None
    if values is None:  # an empty YAML file: the defaults
        return {}
    if not isinstance(values, dict):
        raise CapvectorError(f"config file {path}: expected a mapping of field: value at the top level")
    return values


def load_config(path: str | Path | None = None, overrides: Sequence[str] = ()) -> TrainConfig:
    """A config from a YAML (.yaml/.yml) or TOML (.toml) file (or the defaults), then `key=value` overrides."""
    values: dict[Any, Any] = {}
    origin = "config"
    if path is not None:
        values, origin = read_file(Path(path)), str(path)
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
    write_text(path, yaml.safe_dump(dataclasses.asdict(config), sort_keys=False))


def result_fields(config: TrainConfig) -> dict[str, Any]:
    """The fields that determine the trained weights (everything but bookkeeping)."""
    return {k: v for k, v in dataclasses.asdict(config).items() if k not in BOOKKEEPING}


def config_hash(config: TrainConfig) -> str:
    return content_hash(result_fields(config))
