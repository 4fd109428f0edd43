"""L_orth as a drop-in for training loops that are not capvector's: plain PyTorch, a Hugging Face Trainer (callback)
and Accelerate. Each trains a tiny GPT-2 (built from a config, nothing downloaded) from "theta_meta" with gamma set
to the direction the task's first gradient step takes, so plain training moves along gamma and the regularizer
must visibly stop that."""

import pytest
import torch

transformers = pytest.importorskip("transformers")

from capvector.training.orthogonal import build_regularizer  # noqa: E402

STEPS, LAMBDA = 30, 100.0


def tiny_model() -> torch.nn.Module:
    torch.manual_seed(0)
    config = transformers.GPT2Config(vocab_size=32, n_positions=16, n_embd=16, n_layer=1, n_head=2)
    return transformers.GPT2LMHeadModel(config)


def batches(count: int, size: int = 8) -> list[dict[str, torch.Tensor]]:
    generator = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, 32, (count * size, 12), generator=generator)
    tokens[:, 1::2] = (tokens[:, 0::2] + 1) % 32  # something learnable
    return [{"input_ids": t, "labels": t} for t in tokens.split(size)]


def gamma_along_the_first_step(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    model.zero_grad()
    model(**batches(1)[0]).loss.backward()
    gamma = {name: -p.grad.clone() for name, p in model.named_parameters() if p.dim() == 2}
    model.zero_grad()
    return gamma


def retention(model: torch.nn.Module, start: dict[str, torch.Tensor], gamma: dict[str, torch.Tensor]) -> float:
    """How far training moved along gamma: sum_l <theta_l - theta_meta_l, gamma_l / |gamma_l|>."""
    params = dict(model.named_parameters())
    with torch.no_grad():
        return sum(float(torch.dot((params[k] - start[k]).flatten(), g.flatten()) / g.norm()) for k, g in gamma.items())


def plain_loop(regularize: bool) -> float:
    model = tiny_model()
    gamma = gamma_along_the_first_step(model)
    start = {k: v.detach().clone() for k, v in model.named_parameters()}
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    reg = build_regularizer(model, gamma)  # while the model holds theta_meta
    for batch in batches(STEPS):
        model(**batch).loss.backward()
        if regularize:
            reg.add_grad_(LAMBDA)  # after backward, before the step
        optimizer.step()
        optimizer.zero_grad()
    return retention(model, start, gamma)


def test_plain_pytorch_loop():
    free, kept = plain_loop(False), plain_loop(True)
    assert free > 0.05 and abs(kept) < 0.2 * free


def trainer_run(tmp_path, regularize: bool) -> tuple[float, list[tuple[int, float]]]:
    from capvector.training.trainer_callback import CapVectorCallback

    model = tiny_model()
    gamma = gamma_along_the_first_step(model)
    start = {k: v.detach().clone() for k, v in model.named_parameters()}
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path / ("reg" if regularize else "free")),
        max_steps=STEPS,
        per_device_train_batch_size=8,
        learning_rate=1e-2,
        lr_scheduler_type="constant",
        weight_decay=0.0,
        logging_steps=10,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        disable_tqdm=True,
        seed=0,
    )
    samples = [{"input_ids": row, "labels": row} for b in batches(STEPS) for row in b["input_ids"]]
    callbacks = [CapVectorCallback(gamma, orth_lambda=LAMBDA)] if regularize else []
    transformers.Trainer(model=model, args=args, train_dataset=samples, callbacks=callbacks).train()
    return retention(model, start, gamma), callbacks[0].history if callbacks else []


def test_hugging_face_trainer_callback(tmp_path):
    free, _ = trainer_run(tmp_path, False)
    kept, history = trainer_run(tmp_path, True)
    assert free > 0.05 and abs(kept) < 0.2 * free
    assert [step for step, _ in history] == list(range(STEPS))  # once per optimizer step, before it


def test_accelerate_loop():
    accelerate = pytest.importorskip("accelerate")

    def run(regularize: bool) -> float:
        accelerator = accelerate.Accelerator(cpu=True)
        model = tiny_model()
        gamma = gamma_along_the_first_step(model)
        start = {k: v.detach().clone() for k, v in model.named_parameters()}
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
        model, optimizer = accelerator.prepare(model, optimizer)
        reg = build_regularizer(accelerator.unwrap_model(model), gamma)
        for batch in batches(STEPS):
            accelerator.backward(model(**batch).loss)
            if regularize and accelerator.sync_gradients:  # once per optimizer step, after the all-reduce
                reg.add_grad_(LAMBDA)
            optimizer.step()
            optimizer.zero_grad()
        return retention(accelerator.unwrap_model(model), start, gamma)

    free, kept = run(False), run(True)
    assert free > 0.05 and abs(kept) < 0.2 * free
