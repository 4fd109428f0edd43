"""CapVector's regularizer inside a Hugging Face `Trainer`: one callback, no change to the training script.

    from capvector.params.vectors import open_vector
    from capvector.training.trainer_callback import CapVectorCallback

    trainer = Trainer(model=model, args=args, train_dataset=data,
                      callbacks=[CapVectorCallback(open_vector("gamma"), orth_lambda=10.0)])
    trainer.train()   # the model must hold theta_meta (capvector merge's output) when training begins

The regularizer is built when training begins, from the parameters the model holds then (theta_meta), and its
gradient lambda * dL_orth/dtheta is added to the parameters' gradients right before each optimizer step, after
the Trainer's gradient accumulation, all-reduce and clipping (so the clip bounds the task gradient alone). PEFT
models get the LoRA form. L_orth's value at every optimizer step is kept in `callback.history` ((step, value)
pairs) and its mean since the last log is added to the logs as `orth_loss` (the console and callbacks registered
after this one see it; the Trainer's log_history is written before callbacks run).
This module imports transformers; nothing else in capvector imports it.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from transformers import TrainerCallback

from capvector.training.orthogonal import OrthogonalRegularizer, build_regularizer


class CapVectorCallback(TrainerCallback):
    """Adds `orth_lambda` * L_orth's gradient before every optimizer step of a Trainer.

    `gamma`: {parameter name: tensor} (an opened capability vector works). `regularizer_args` go to
    capvector.training.orthogonal.build_regularizer (reduction, lora_form, rank, mode).
    """

    def __init__(self, gamma: Mapping[str, torch.Tensor], orth_lambda: float = 10.0, **regularizer_args: Any):
        self.gamma = gamma
        self.orth_lambda = orth_lambda
        self.regularizer_args = regularizer_args
        self.regularizer: OrthogonalRegularizer | None = None
        self.history: list[tuple[int, float]] = []
        self._values: list[float] = []

    def on_train_begin(
        self, args: Any, state: Any, control: Any, model: torch.nn.Module | None = None, **_: Any
    ) -> None:
        if self.regularizer is None:  # a resumed Trainer calls this again; theta_meta was read the first time
            assert model is not None, "the Trainer passes its model to callbacks"
            self.regularizer = build_regularizer(model, self.gamma, **self.regularizer_args)

    def on_pre_optimizer_step(self, args: Any, state: Any, control: Any, **_: Any) -> None:
        assert self.regularizer is not None, "on_train_begin builds the regularizer"
        value = float(self.regularizer.add_grad_(self.orth_lambda))
        self.history.append((state.global_step, value))
        self._values.append(value)

    def on_log(self, args: Any, state: Any, control: Any, logs: dict[str, float] | None = None, **_: Any) -> None:
        if logs is not None and self._values:
            logs["orth_loss"] = sum(self._values) / len(self._values)
            self._values.clear()
