"""Small real checkpoints in the layouts users have: single safetensors, sharded safetensors, PyTorch .bin."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file


def random_state(shapes: dict[str, tuple[int, ...]], dtype=torch.float32, seed: int = 0, scale: float = 1.0) -> dict:
    generator = torch.Generator().manual_seed(seed)
    return {name: (scale * torch.randn(shape, generator=generator)).to(dtype) for name, shape in shapes.items()}


def perturbed(state: dict, seed: int, scale: float = 0.01) -> dict:
    generator = torch.Generator().manual_seed(seed)
    return {
        name: (t.double() + scale * torch.randn(t.shape, generator=generator, dtype=torch.float64)).to(t.dtype)
        if t.is_floating_point()
        else t.clone()
        for name, t in state.items()
    }


def write_checkpoint(folder: Path, state: dict, layout: str = "single", extra_files: bool = True) -> Path:
    """layout: 'single' (model.safetensors), 'sharded' (2 shards + index), 'bin' (pytorch_model.bin), 'file' (one
    .safetensors file, returned as the path)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    if extra_files:
        (folder / "config.json").write_text(json.dumps({"model_type": "toy", "hidden_size": 8}))
        (folder / "tokenizer.json").write_text("{}")
        (folder / "normalization").mkdir(exist_ok=True)
        (folder / "normalization" / "stats.json").write_text(json.dumps({"q01": [0.0], "q99": [1.0]}))
    if layout == "single":
        save_file(state, folder / "model.safetensors", metadata={"format": "pt"})
    elif layout == "file":
        path = folder / "weights.safetensors"
        save_file(state, path, metadata={"format": "pt"})
        return path
    elif layout == "bin":
        torch.save(state, folder / "pytorch_model.bin")
    elif layout == "sharded":
        names = list(state)
        half = max(1, len(names) // 2)
        parts = [names[:half], names[half:]] if len(names) > 1 else [names]
        weight_map = {}
        for i, part in enumerate(parts):
            shard = f"model-{i + 1:05d}-of-{len(parts):05d}.safetensors"
            save_file({n: state[n] for n in part}, folder / shard, metadata={"format": "pt"})
            weight_map.update({n: shard for n in part})
        total = sum(t.numel() * t.element_size() for t in state.values())
        (folder / "model.safetensors.index.json").write_text(
            json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map})
        )
    else:
        raise ValueError(layout)
    return folder


def read_state(path: Path) -> dict:
    """Read a checkpoint independently of capvector's reader (safetensors' own loader, torch.load)."""
    from safetensors.torch import load_file

    path = Path(path)
    if path.is_file():
        return load_file(path) if path.suffix == ".safetensors" else torch.load(path, weights_only=True)
    state = {}
    for file in sorted(path.glob("*.safetensors")):
        state.update(load_file(file))
    for file in sorted(path.glob("*.bin")):
        state.update(torch.load(file, weights_only=True))
    return state
