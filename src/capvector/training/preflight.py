"""The checks `train` makes before it builds or writes anything: each bad input ends in one CapvectorError that
names the field and the fix (the CLI prints it as one line and exits 2)."""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import inspect
import json
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, cast

import torch

from capvector.errors import CapvectorError
from capvector.files import content_hash, read_json
from capvector.params.checkpoints import read_safetensors_header
from capvector.params.merging import MERGE_RECORD
from capvector.params.vectors import open_vector
from capvector.training.checkpointing import POLICY_DIR, checkpoint_dirs
from capvector.training.config import TrainConfig

Vector = Mapping[str, torch.Tensor]


def check_inputs(config: TrainConfig, world: int, given: set[str], vector: Vector | None) -> None:
    """Errors found from the config, the process count and the objects given to train() (their names in
    `given`: policy, dataset, auxiliary, vector), before anything is built or written."""
    try:
        check_strategy(config, given)
        parts = world * config.grad_accum_steps
        if config.batch_size % parts:
            raise CapvectorError(
                f"field 'batch_size' is {config.batch_size}, which does not split evenly across {world} processes x "
                f"{config.grad_accum_steps} micro-batches (grad_accum_steps); use a multiple of {parts}"
            )
        if config.finetune == "lora" and importlib.util.find_spec("peft") is None:
            raise CapvectorError("finetune 'lora' needs PEFT: pip install capvector[lora]")
        for name in ("policy", "dataset", "auxiliary"):
            if name not in given and (name != "auxiliary" or config.strategy == "aux"):
                factory(config, name)  # imported and its arguments checked, not called
        if config.strategy == "capvector" and config.check_merge:
            check_merged_from(config, vector)
        out_dir = Path(config.out_dir)
        if not config.resume and (checkpoint_dirs(out_dir) or (out_dir / POLICY_DIR).exists()):
            raise CapvectorError(
                f"{out_dir} already holds a run; set resume=true to continue it or choose another out_dir"
            )
    except OSError as error:  # a path the file system refuses (too long, no permission)
        raise CapvectorError(f"{error.filename!r}: {error.strerror}; check the paths in the config") from None


def check_strategy(config: TrainConfig, given: set[str]) -> None:
    """What each strategy and finetuning mode needs."""
    if config.strategy == "aux" and "auxiliary" not in given and not config.auxiliary:
        raise CapvectorError("strategy 'aux' needs an auxiliary objective: set 'auxiliary' to 'package.module:factory'")
    if config.finetune == "lora" and config.distributed == "fsdp":
        raise CapvectorError(
            "finetune 'lora' with distributed 'fsdp' is not supported (the regularizer's LoRA forms need whole "
            "adapters); LoRA trains small adapters on a frozen base that fits each GPU: use distributed 'ddp'"
        )
    if config.finetune == "lora" and not config.init_from:
        raise CapvectorError("finetune 'lora' needs 'init_from': the base policy folder the adapter applies to")
    if config.strategy == "capvector":
        if "vector" not in given and not config.vector:
            raise CapvectorError("strategy 'capvector' needs 'vector': the capability vector's folder")
        if "policy" not in given and not config.init_from:
            raise CapvectorError("strategy 'capvector' needs 'init_from': the merged checkpoint (theta_meta)")
        if config.orth_lambda <= 0 and not config.orth_hard:
            raise CapvectorError("strategy 'capvector' with orth_lambda 0 and orth_hard false regularizes nothing")


def factory(config: TrainConfig, name: str) -> Callable[[], Any]:
    """The policy, dataset or auxiliary factory the config names, with its arguments bound: policy =
    factory(init_from, **policy_args), the others factory(**<name>_args)."""
    spec: str = getattr(config, name)
    args: tuple[Any, ...] = (config.init_from,) if name == "policy" else ()
    kwargs: dict[str, Any] = getattr(config, f"{name}_args")
    module_name, sep, attribute = spec.partition(":")
    if not sep or not module_name or not attribute:
        raise CapvectorError(
            f"config field '{name}' is {spec!r}; give an import string 'package.module:factory' "
            f"(or pass the {name} object to train())"
        )
    try:
        function = getattr(importlib.import_module(module_name), attribute)
    except (ImportError, AttributeError, TypeError, ValueError) as error:  # TypeError: a relative module name
        raise CapvectorError(f"config field '{name}': cannot import {spec!r}: {error}") from None
    if not callable(function):
        raise CapvectorError(f"config field '{name}': {spec!r} is not callable; name a factory function or class")
    try:
        inspect.signature(function).bind(*args, **kwargs)
    except TypeError as error:
        raise CapvectorError(f"config field '{name}_args' does not fit {spec}: {error}") from None
    except ValueError:  # no signature to check (a builtin): the call will tell
        pass
    return lambda: function(*args, **kwargs)


def merge_record(init_from: Path) -> Any:
    """The record `capvector merge` left in a merged folder (or a merged file's safetensors header), or None."""
    if init_from.is_dir():
        return read_json(init_from / MERGE_RECORD)
    if init_from.suffix == ".safetensors" and init_from.is_file():
        record = (read_safetensors_header(init_from)[1] or {}).get("capvector_merge")
        with contextlib.suppress(ValueError):
            return json.loads(record) if record else None
    return None


def check_merged_from(config: TrainConfig, vector: Vector | None) -> None:
    """Strategy "capvector" starts from theta_meta = theta_pt + alpha * gamma: init_from's merge record must
    name the vector given, by its metadata (which holds its creation time, sources and per-tensor norms)."""
    fix = "or set check_merge=false if theta_meta was made another way"
    given = "the vector given to train()" if vector is not None else f"vector {config.vector}"
    if not config.init_from:
        raise CapvectorError(f"strategy 'capvector' checks init_from's merge record; give init_from, {fix}")
    record = merge_record(Path(config.init_from))
    if not isinstance(record, dict):
        raise CapvectorError(
            f"init_from {config.init_from} has no merge record ({MERGE_RECORD}), so nothing says it is theta_pt + "
            f"alpha * gamma for {given}; start from the output of `capvector merge --vector {config.vector or 'V'}`, "
            f"{fix}"
        )
    metadata = vector_metadata(config, vector)
    if not metadata:
        raise CapvectorError(
            f"{given} carries no capvector metadata to compare with init_from's merge record; use a vector "
            f"written by `capvector extract`, {fix}"
        )
    if content_hash(record.get("vector")) != content_hash(metadata):
        raise CapvectorError(
            f"init_from {config.init_from} was merged from another vector ({describe(record.get('vector'))}) than "
            f"{given} ({describe(metadata)}); start from the merge of this vector or give the vector it was merged "
            f"from, {fix}"
        )


def vector_metadata(config: TrainConfig, vector: Vector | None) -> Any:
    if vector is not None:
        return getattr(vector, "metadata", None)
    opened = open_vector(cast(str, config.vector))
    opened.close()
    return opened.metadata


def describe(metadata: Any) -> str:
    if not isinstance(metadata, dict):
        return "no metadata"
    return f"created {metadata.get('created', '?')}, |gamma| {metadata.get('global_norm', '?')}"


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise CapvectorError(f"field 'device' is {name!r} but CUDA is not available; use 'auto' or 'cpu'")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise CapvectorError(f"field 'device' is {name!r} but there are {torch.cuda.device_count()} CUDA devices")
    return device
