"""A small vision-language-action policy in the spirit of OpenVLA-OFT, sized for training on a CPU.

Both camera images go through a shared conv stem and a small vision transformer (patch tokens); the
instruction's words are hashed into an embedding table and encoded by a small transformer; one token
carries the proprioceptive state. The trunk, a transformer with full attention, reads
[instruction, visual, state, action queries] and the action query tokens are decoded in parallel by an
MLP head into a chunk of normalized actions, trained with an L1 loss (OpenVLA-OFT's recipe).

Module names are plain and stable (`trunk.layers.3`): capability vectors are computed per parameter
name, and auxiliary objectives hook a trunk layer by name.
"""

from __future__ import annotations

import functools
import json
import re
import zlib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from capvector.bench.augmentation import random_shift
from capvector.bench.env.features import ACTION_KEY, PRIVILEGED_KEY, STATE_KEY
from capvector.bench.env.tasks import TASKS, instruction
from capvector.bench.policy.configuration_policy import PolicyConfig, with_privileged
from capvector.errors import CapvectorError
from capvector.files import atomic_path

WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "config.json"
TOKENIZER_NAME = "tokenizer.json"
WORD_PATTERN = r"[a-z0-9]+"
TOKENIZER = {  # tokenize's scheme as data (tokenizer.json)
    "type": "hashed words",
    "lowercase": True,
    "words": WORD_PATTERN,
    "ids": "1 + crc32(utf-8 word) % (buckets - 1), the first max_words words; 0 pads",
}


def normalize(x: torch.Tensor, q01: torch.Tensor, q99: torch.Tensor) -> torch.Tensor:
    """Map [q01, q99] to [-1, 1] and clip, as OpenVLA-OFT does for actions and proprioception."""
    return (2 * (x - q01) / (q99 - q01).clamp(min=1e-8) - 1).clamp(-1, 1)


def unnormalize(y: torch.Tensor, q01: torch.Tensor, q99: torch.Tensor) -> torch.Tensor:
    return (y + 1) / 2 * (q99 - q01) + q01


def masked_l1(pred: torch.Tensor, target: torch.Tensor, is_pad: torch.Tensor) -> torch.Tensor:
    """Mean absolute error over the chunk steps that are real (not padding past the episode's end)."""
    keep = (~is_pad).to(pred.dtype)
    return ((pred - target).abs().mean(-1) * keep).sum() / keep.sum().clamp(min=1)


def save_folder(module: nn.Module, config: Any, directory: str | Path, extras: Mapping[str, Any]) -> None:
    """`module`'s weights as model.safetensors, `config` as config.json and each of `extras` as a JSON file, written
    to a temporary folder renamed over `directory` once complete."""
    with atomic_path(directory) as temporary:
        temporary.mkdir(parents=True)
        save_file(
            {name: value.detach().cpu().contiguous() for name, value in module.state_dict().items()},
            temporary / WEIGHTS_NAME,
        )
        config.to_json(temporary / CONFIG_NAME)
        for name, value in extras.items():
            (temporary / name).write_text(json.dumps(value, indent=1) + "\n")


def require_folder(folder: Path, what: str, written_by: str) -> None:
    """Refuse in one line a `what` folder without its weights or its config."""
    for name in (WEIGHTS_NAME, CONFIG_NAME):
        if not (folder / name).is_file():
            raise CapvectorError(
                f"{what}: {folder / name} is missing; a {what} folder holds {WEIGHTS_NAME} and {CONFIG_NAME}, "
                f"written by {written_by}"
            )


def load_weights(module: nn.Module, folder: Path, what: str) -> None:
    """Load `folder`/model.safetensors into `module` (built from `folder`/config.json), refusing in one line a file
    whose tensors do not match the config's (missing, unexpected or of another shape)."""
    weights = load_file(folder / WEIGHTS_NAME)
    expected = module.state_dict()
    missing, unexpected = sorted(set(expected) - set(weights)), sorted(set(weights) - set(expected))
    wrong = sorted(name for name in set(expected) & set(weights) if weights[name].shape != expected[name].shape)
    if missing or unexpected or wrong:
        raise CapvectorError(
            f"{what}: {folder / WEIGHTS_NAME} does not match {folder / CONFIG_NAME}: missing {missing[:5]}, "
            f"unexpected {unexpected[:5]}, wrong shape {wrong[:5]}"
        )
    module.load_state_dict(weights)


@functools.lru_cache(maxsize=4096)
def tokenize(instruction: str, buckets: int, max_words: int) -> tuple[int, ...]:
    """Word ids by a stable hash (crc32) into buckets 1..buckets-1; 0 pads to max_words (TOKENIZER says it as data)."""
    words = re.findall(WORD_PATTERN, instruction.lower())[:max_words]
    ids = [1 + zlib.crc32(word.encode()) % (buckets - 1) for word in words]
    return tuple(ids + [0] * (max_words - len(ids)))


def tokenizer_file(config: PolicyConfig) -> dict[str, Any]:
    """tokenizer.json: how `tokenize` turns an instruction into ids, written into every policy folder so that the
    folder alone says it (config.json holds the table's size), with the ids of the benchmark's words to check a
    reimplementation against."""
    words = sorted({word for task in TASKS for word in re.findall(WORD_PATTERN, instruction(task).lower())})
    return TOKENIZER | {
        "buckets": config.text_buckets,
        "max_words": config.max_words,
        "vocabulary": {word: tokenize(word, config.text_buckets, 1)[0] for word in words},
    }


def check_tokenizer(path: Path, config: PolicyConfig) -> None:
    """A policy folder's tokenizer.json (folders written before it existed have none) must describe this module's
    tokenizer with config.json's sizes, and its word ids must be the ones `tokenize` computes."""
    if not path.is_file():
        return
    try:
        found = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise CapvectorError(f"policy: cannot read {path}: {error}") from None
    expected = tokenizer_file(config)
    vocabulary = found.get("vocabulary") if isinstance(found, dict) else None
    if (
        not isinstance(vocabulary, dict)
        or {key: found.get(key) for key in expected} != expected | {"vocabulary": vocabulary}
        or any(tokenize(str(word), config.text_buckets, 1)[0] != ids for word, ids in vocabulary.items())
    ):
        raise CapvectorError(
            f"policy: {path} describes another instruction tokenizer than this capvector's ({TOKENIZER['ids']} with "
            f"the sizes in config.json); the policy would read its instructions wrong"
        )


BIAS_LENGTH = 0.1  # metres: position_bias changes over about this distance, so it is constant while a thing is still


def position_bias(positions: torch.Tensor, rms: float) -> torch.Tensor:
    """A systematic error on positions (B, 3k) of k things: for each coordinate, rms * sqrt(2) * cos(w . p + b) of
    the xyz p of the thing it belongs to, with w ~ N(0, 1 / BIAS_LENGTH^2) per axis and b ~ U(0, 2 pi) fixed (one
    seed for every policy). Over random w and b each coordinate's error has RMS `rms`; for fixed ones it is a smooth
    function of the scene, the same at every read, as a learned estimate's error is on a given placement."""
    things = positions.reshape(positions.shape[0], -1, 3)
    generator = torch.Generator().manual_seed(0)
    frequencies = torch.randn(things.shape[1], 3, 3, generator=generator) / BIAS_LENGTH  # (thing, coordinate, axis)
    phases = 2 * np.pi * torch.rand(things.shape[1], 3, generator=generator)
    angle = torch.einsum("bka,kca->bkc", things, frequencies.to(positions)) + phases.to(positions)
    return (rms * np.sqrt(2) * torch.cos(angle)).reshape(positions.shape)


class Block(nn.Module):
    """Pre-norm transformer block with full (bidirectional) attention."""

    def __init__(self, dim: int, heads: int, mlp_ratio: int):
        super().__init__()
        self.heads = heads
        self.norm1 = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, mlp_ratio * dim), nn.GELU(), nn.Linear(mlp_ratio * dim, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, tokens, dim = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(batch, tokens, 3, self.heads, -1).permute(2, 0, 3, 1, 4)
        attended = F.scaled_dot_product_attention(q, k, v)
        x = x + self.proj(attended.transpose(1, 2).reshape(batch, tokens, dim))
        return x + self.mlp(self.norm2(x))


class Transformer(nn.Module):
    def __init__(self, config: PolicyConfig, depth: int):
        super().__init__()
        self.layers = nn.ModuleList(Block(config.dim, config.heads, config.mlp_ratio) for _ in range(depth))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x)
        return x


class VisionEncoder(nn.Module):
    """Conv stem (stride-2 convolutions, then a patchify conv) and a transformer over each camera's patches."""

    def __init__(self, config: PolicyConfig):
        super().__init__()
        convs, channels = [], 3
        for out in config.stem_channels:
            # GroupNorm, not BatchNorm: no running statistics outside the parameters. With it the policy told
            # two reach placements apart by their 2-pixel goal markers well within 300 steps; without, not.
            convs += [nn.Conv2d(channels, out, 3, stride=2, padding=1), nn.GroupNorm(8, out), nn.GELU()]
            channels = out
        patch = config.image_size // 2 ** len(config.stem_channels) // config.patch_grid
        convs.append(nn.Conv2d(channels, config.dim, patch, stride=patch))
        self.stem = nn.Sequential(*convs)
        self.position = nn.Parameter(torch.randn(config.patch_grid**2, config.dim) * 0.02)
        self.camera = nn.Parameter(torch.randn(len(config.cameras), 1, config.dim) * 0.02)
        self.encoder = Transformer(config, config.vision_layers)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 (B, cameras, 3, H, W) -> patch tokens (B, cameras * patch_grid**2, dim)."""
        batch, cameras = images.shape[:2]
        pixels = images.flatten(0, 1).float() / 127.5 - 1
        patches = self.stem(pixels).flatten(2).transpose(1, 2) + self.position
        patches = patches.unflatten(0, (batch, cameras)) + self.camera
        return self.encoder(patches.flatten(0, 1)).unflatten(0, (batch, cameras)).flatten(1, 2)


class TextEncoder(nn.Module):
    """Hashed word embeddings and a small transformer; padding tokens are ordinary tokens (no mask)."""

    def __init__(self, config: PolicyConfig):
        super().__init__()
        self.embed = nn.Embedding(config.text_buckets, config.dim)
        self.position = nn.Parameter(torch.randn(config.max_words, config.dim) * 0.02)
        self.encoder = Transformer(config, config.text_layers)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.encoder(self.embed(ids) + self.position)


class Policy(nn.Module):
    """`policy(batch) -> {"action": masked L1}`; `predict_chunk(observation)` for closed-loop evaluation."""

    state_q01: torch.Tensor  # normalization bounds: buffers made from the config, not stored with the weights
    state_q99: torch.Tensor
    action_q01: torch.Tensor
    action_q99: torch.Tensor
    privileged_q01: torch.Tensor
    privileged_q99: torch.Tensor

    def __init__(self, config: PolicyConfig):
        super().__init__()
        self.config = config
        self.vision = VisionEncoder(config)
        self.text = TextEncoder(config)
        self.state = nn.Linear(config.state_dim, config.dim)
        self.privileged = nn.Linear(config.privileged_dim, config.dim) if config.privileged_dim else None
        self.action_queries = nn.Parameter(torch.randn(config.chunk_size, config.dim) * 0.02)
        self.trunk = Transformer(config, config.trunk_layers)
        self.norm = nn.LayerNorm(config.dim)
        self.head = nn.Sequential(
            nn.Linear(config.dim, config.dim), nn.GELU(), nn.Linear(config.dim, config.action_dim)
        )
        # Normalization bounds come from config.json, never from the weights file.
        for name in ("state_q01", "state_q99", "action_q01", "action_q99", "privileged_q01", "privileged_q99"):
            self.register_buffer(name, torch.tensor(getattr(config, name), dtype=torch.float32), persistent=False)

    @property
    def visual_token_slice(self) -> slice:
        """Where the visual tokens sit in the trunk's sequence [instruction, visual, state, queries]."""
        start = self.config.max_words
        return slice(start, start + len(self.config.cameras) * self.config.patch_grid**2)

    @property
    def action_query_slice(self) -> slice:
        """Where the action query tokens sit in the trunk's sequence: last, the chunk the head decodes."""
        return slice(-self.config.chunk_size, None)

    @property
    def device(self) -> torch.device:
        return self.action_queries.device

    def _images(self, batch: Mapping[str, Any]) -> torch.Tensor:
        images = []
        for camera in self.config.cameras:
            key = f"observation.images.{camera}"
            if key not in batch:
                raise CapvectorError(
                    f"policy: the batch has no '{key}'; the policy was built for cameras {list(self.config.cameras)}"
                )
            image = torch.as_tensor(batch[key], device=self.device)
            if tuple(image.shape[-3:]) != (3, self.config.image_size, self.config.image_size):
                raise CapvectorError(
                    f"policy: '{key}' has shape {tuple(image.shape)}, expected (B, 3, "
                    f"{self.config.image_size}, {self.config.image_size}) as in the policy's config"
                )
            images.append(image)
        return torch.stack(images, dim=1)

    def _instruction_ids(self, instructions: list[str] | str) -> torch.Tensor:
        if isinstance(instructions, str):
            instructions = [instructions]
        ids = [tokenize(text, self.config.text_buckets, self.config.max_words) for text in instructions]
        return torch.tensor(ids, dtype=torch.long, device=self.device)

    def predict_normalized(self, batch: Mapping[str, Any], images: torch.Tensor | None = None) -> torch.Tensor:
        """The action chunk in normalized units, (B, chunk_size, action_dim); `images` replace the batch's."""
        state = torch.as_tensor(batch[STATE_KEY], device=self.device, dtype=torch.float32)
        parts = [
            self.text(self._instruction_ids(batch["instruction"])),
            self.vision(self._images(batch) if images is None else images),
            self.state(normalize(state, self.state_q01, self.state_q99)).unsqueeze(1),
        ]
        if self.privileged is not None:
            if PRIVILEGED_KEY not in batch:
                raise CapvectorError(f"policy: this oracle reads '{PRIVILEGED_KEY}', which the batch does not have")
            facts = torch.as_tensor(batch[PRIVILEGED_KEY], device=self.device, dtype=torch.float32)
            if self.config.privileged_noise:
                facts = facts + self.config.privileged_noise * torch.randn_like(facts)
            if self.config.privileged_bias:
                facts = facts + position_bias(facts, self.config.privileged_bias)
            parts.append(self.privileged(normalize(facts, self.privileged_q01, self.privileged_q99)).unsqueeze(1))
        parts.append(self.action_queries.expand(state.shape[0], -1, -1))
        tokens = torch.cat(parts, dim=1)
        queries = self.trunk(tokens)[:, self.action_query_slice]
        return self.head(self.norm(queries))

    def forward(self, batch: Mapping[str, Any]) -> dict[str, torch.Tensor]:
        target = normalize(batch[ACTION_KEY].to(self.device), self.action_q01, self.action_q99)
        images = self._images(batch)
        if self.training and self.config.augment_shift:
            images = random_shift(images, self.config.augment_shift)
        prediction = self.predict_normalized(batch, images)
        return {"action": masked_l1(prediction, target, batch["action_is_pad"].to(self.device))}

    def reset(self) -> None:
        """Nothing to clear: the policy is stateless between chunks."""

    @torch.no_grad()
    def predict_chunk(self, observation: Mapping[str, Any]) -> np.ndarray:
        """One observation (numpy, no batch axis) -> (chunk_size, action_dim) actions in [-1, 1]."""
        keys = [f"observation.images.{camera}" for camera in self.config.cameras] + [STATE_KEY]
        keys += [PRIVILEGED_KEY] if self.privileged is not None else []
        batch = {key: torch.as_tensor(np.asarray(observation[key])).unsqueeze(0) for key in keys}
        batch["instruction"] = observation["instruction"]
        actions = unnormalize(self.predict_normalized(batch)[0], self.action_q01, self.action_q99)
        return actions.clamp(-1, 1).cpu().numpy()

    def save_pretrained(self, directory: str | Path) -> None:
        """Write model.safetensors + config.json to a temporary folder, then rename it over `directory`."""
        save_folder(self, self.config, directory, {TOKENIZER_NAME: tokenizer_file(self.config)})

    def as_oracle(self, stats: Mapping[str, Mapping[str, list]], privileged_dim: int) -> Policy:
        """This policy told the object and goal positions too (configuration_policy.with_privileged): every weight
        kept, the projection of the positions into one more token new."""
        if self.privileged is not None:
            raise CapvectorError(
                "policy: this policy already reads the object and goal positions; start from one that does not"
            )
        oracle = Policy(with_privileged(self.config, stats, privileged_dim)).to(self.device)
        missing, unexpected = oracle.load_state_dict(self.state_dict(), strict=False)
        assert not unexpected and all(name.startswith("privileged.") for name in missing), (missing, unexpected)
        return oracle

    @classmethod
    def from_pretrained(cls, directory: str | Path, device: str | torch.device = "cpu") -> Policy:
        folder = Path(directory)
        require_folder(folder, "policy", "save_pretrained")
        config = PolicyConfig.from_json(folder / CONFIG_NAME)
        check_tokenizer(folder / TOKENIZER_NAME, config)
        policy = cls(config)
        load_weights(policy, folder, "policy")
        return policy.to(device)
