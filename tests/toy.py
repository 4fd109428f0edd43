"""A tiny policy, dataset and auxiliary objective for the training engine's tests (seconds on a CPU).

The training engine imports its factories by import string ("toy:make_policy"), also in the subprocesses of the
resume and DDP tests: tests/ is on sys.path (pytest's `pythonpath`) and on the subprocesses' PYTHONPATH
(tests/conftest.py).
"""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from capvector.training.auxiliary import AuxiliaryObjective
from capvector.training.config import TrainConfig

KILL_ENV = "CAPVECTOR_TOY_KILL_AT"  # SIGKILL this process at that forward call (a crash that skips all cleanup)


class ToyPolicy(nn.Module):
    """Regression of y from x through a hidden layer named `encoder`; records the sample indices it sees."""

    def __init__(self, hidden: int = 16, dropout: float = 0.0, nan_at_call: int | None = None):
        super().__init__()
        self.config = {"hidden": hidden, "dropout": dropout}
        self.encoder = nn.Linear(8, hidden)
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Linear(hidden, 4)
        self.nan_at_call = nan_at_call
        self.calls = 0
        self.seen: list[list[int]] = []

    def forward(self, batch):
        self.calls += 1
        if os.environ.get(KILL_ENV) == str(self.calls):
            os.kill(os.getpid(), signal.SIGKILL)
        self.seen.append(batch["index"].tolist())
        hidden = self.dropout(F.gelu(self.encoder(batch["x"])))
        loss = F.mse_loss(self.head(hidden), batch["y"])
        if self.calls == self.nan_at_call:
            loss = loss * float("nan")
        return {"action": loss}

    def save_pretrained(self, path):
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        (path / "config.json").write_text(json.dumps(self.config))
        save_file(self.state_dict(), str(path / "model.safetensors"))

    @classmethod
    def from_pretrained(cls, path, **kwargs):
        policy = cls(**json.loads((Path(path) / "config.json").read_text()), **kwargs)
        policy.load_state_dict(load_file(str(Path(path) / "model.safetensors")))
        return policy


def make_policy(init_from: str | None, hidden: int = 16, dropout: float = 0.0, nan_at_call: int | None = None):
    if init_from:
        return ToyPolicy.from_pretrained(init_from, nan_at_call=nan_at_call)
    return ToyPolicy(hidden, dropout, nan_at_call)


class ToyDataset(torch.utils.data.Dataset):
    """y = x W + noise, with a fixed W; samples are dicts like the benchmark's (a string field included)."""

    def __init__(self, size: int = 40, seed: int = 0):
        generator = torch.Generator().manual_seed(seed)
        self.x = torch.randn(size, 8, generator=generator)
        weights = torch.randn(8, 4, generator=generator)
        self.y = self.x @ weights + 0.1 * torch.randn(size, 4, generator=generator)

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return {"x": self.x[i], "y": self.y[i], "index": torch.tensor(i), "instruction": f"task {i % 3}"}


def make_dataset(size: int = 40, seed: int = 0):
    return ToyDataset(size, seed)


class ToyAuxiliary(AuxiliaryObjective):
    """Reconstruct x from the encoder's output through a projector."""

    def __init__(self, hidden: int = 16, weight: float = 0.5):
        super().__init__(layer="encoder", weight=weight)
        self.projector = nn.Linear(hidden, 8)

    def compute(self, features, batch):
        return F.mse_loss(self.projector(features), batch["x"])


def make_auxiliary(hidden: int = 16, weight: float = 0.5):
    return ToyAuxiliary(hidden, weight)


TOY = {"policy": "toy:make_policy", "dataset": "toy:make_dataset", "auxiliary": "toy:make_auxiliary"}


def toy_config(out_dir: Path, **fields) -> TrainConfig:
    """A 12-step run of the toy policy on the toy dataset; `fields` override TrainConfig fields."""
    base = dict(
        TOY,
        out_dir=str(out_dir),
        steps=12,
        batch_size=8,
        lr=1e-2,
        warmup_steps=2,
        checkpoint_every=0,
        log_every=4,
        progress=False,
        tensorboard=False,
    )
    return TrainConfig(**(base | fields))


def weights(run: Path) -> dict[str, torch.Tensor]:
    """The trained policy's tensors of a finished run."""
    return load_file(str(run / "policy" / "model.safetensors"))


def saved_policy(path: Path, seed: int = 0) -> Path:
    """A fresh toy policy saved at `path` (a starting point for init_from)."""
    torch.manual_seed(seed)
    make_policy(None).save_pretrained(path)
    return path


def capvector_fields(root: Path) -> dict:
    """toy_config fields of an 8-step capvector run, from theta_meta (a toy policy whose hidden size, 15, splits
    unevenly over 2 processes) with a gamma on every tensor, weights and biases, both written under `root`."""
    torch.manual_seed(0)
    ToyPolicy(hidden=15).save_pretrained(root / "meta")
    start = load_file(str(root / "meta" / "model.safetensors"))
    gamma = {
        k: torch.randn(v.shape, generator=torch.Generator().manual_seed(i)) for i, (k, v) in enumerate(start.items())
    }
    (root / "gamma").mkdir()
    save_file(gamma, str(root / "gamma" / "gamma.safetensors"))
    return dict(
        strategy="capvector",
        init_from=str(root / "meta"),
        vector=str(root / "gamma"),
        check_merge=False,  # a hand-made gamma
        orth_lambda=10.0,
        steps=8,
        checkpoint_every=4,
        log_every=1,
    )
