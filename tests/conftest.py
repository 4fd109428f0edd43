"""Fixtures shared by the suite: small real checkpoints in the layouts users have; one torch thread; the
subprocesses' import path.

tests/ is on sys.path (pyproject's pytest `pythonpath`) so that `toy` (the training engine's toy factories) imports
by name, here and, through PYTHONPATH, in the subprocesses the resume and DDP tests start.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

TESTS = Path(__file__).parent

State = dict[str, torch.Tensor]


@pytest.fixture(scope="session", autouse=True)
def one_torch_thread() -> Iterator[None]:
    """Every test, and every subprocess it starts, computes on one torch thread: the same arithmetic on any machine
    (a reduction split over more threads rounds differently), and on a shared machine several times faster than
    threads waiting on each other (the benchmark policy's 80 overfitting steps: 11 s on one thread, 62 s on two,
    at load 5 on 2 cores)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("OMP_NUM_THREADS", "1")
        yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session", autouse=True)
def tests_on_subprocess_path() -> Iterator[None]:
    """Subprocesses (torchrun, `python -m capvector.training`) import `toy:make_policy` and the like."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(TESTS), os.environ.get("PYTHONPATH")])))
        yield


@pytest.fixture(scope="session")
def random_state() -> Callable[..., State]:
    """random_state(shapes, dtype=float32, seed=0, scale=1.0): normal tensors of the given shapes."""

    def make(
        shapes: dict[str, tuple[int, ...]], dtype: torch.dtype = torch.float32, seed: int = 0, scale: float = 1.0
    ) -> State:
        generator = torch.Generator().manual_seed(seed)
        return {name: (scale * torch.randn(shape, generator=generator)).to(dtype) for name, shape in shapes.items()}

    return make


@pytest.fixture(scope="session")
def perturbed() -> Callable[..., State]:
    """perturbed(state, seed, scale=0.01): the state plus noise (a finetune of it), non-float tensors copied."""

    def make(state: State, seed: int, scale: float = 0.01) -> State:
        generator = torch.Generator().manual_seed(seed)
        return {
            name: (t.double() + scale * torch.randn(t.shape, generator=generator, dtype=torch.float64)).to(t.dtype)
            if t.is_floating_point()
            else t.clone()
            for name, t in state.items()
        }

    return make


def write_sharded(folder: Path, state: State) -> None:
    """Two shards and model.safetensors.index.json (one shard for a single tensor)."""
    names = list(state)
    half = max(1, len(names) // 2)
    parts = [names[:half], names[half:]] if len(names) > 1 else [names]
    weight_map = {}
    for i, part in enumerate(parts):
        shard = f"model-{i + 1:05d}-of-{len(parts):05d}.safetensors"
        save_file({n: state[n] for n in part}, folder / shard, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(part, shard))
    total = sum(t.numel() * t.element_size() for t in state.values())
    (folder / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map})
    )


@pytest.fixture(scope="session")
def write_checkpoint() -> Callable[..., Path]:
    """write_checkpoint(folder, state, layout="single", extra_files=True) -> the checkpoint's path. layout: 'single'
    (model.safetensors), 'sharded' (2 shards + index), 'bin' (pytorch_model.bin), 'file' (one .safetensors file)."""

    def write(folder: Path, state: State, layout: str = "single", extra_files: bool = True) -> Path:
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        if extra_files:  # what a model folder holds besides its weights
            (folder / "config.json").write_text(json.dumps({"model_type": "toy", "hidden_size": 8}))
            (folder / "tokenizer.json").write_text("{}")
            (folder / "normalization").mkdir(exist_ok=True)
            (folder / "normalization" / "stats.json").write_text(json.dumps({"q01": [0.0], "q99": [1.0]}))
        if layout == "single":
            save_file(state, folder / "model.safetensors", metadata={"format": "pt"})
        elif layout == "file":
            save_file(state, folder / "weights.safetensors", metadata={"format": "pt"})
            return folder / "weights.safetensors"
        elif layout == "bin":
            torch.save(state, folder / "pytorch_model.bin")
        elif layout == "sharded":
            write_sharded(folder, state)
        else:
            raise ValueError(layout)
        return folder

    return write


@pytest.fixture(scope="session")
def read_state() -> Callable[..., State]:
    """read_state(path): a checkpoint's tensors, read independently of capvector (safetensors' loader, torch.load)."""

    def read(path: Path) -> State:
        path = Path(path)
        if path.is_file():
            return load_file(path) if path.suffix == ".safetensors" else torch.load(path, weights_only=True)
        state: State = {}
        for file in sorted(path.glob("*.safetensors")):
            state.update(load_file(file))
        for file in sorted(path.glob("*.bin")):
            state.update(torch.load(file, weights_only=True))
        return state

    return read
