"""Per-step cost of CapVector's orthogonal regularizer against plain SFT (forward + backward + AdamW step).

    python benchmarks/ortho_overhead.py                   # ~3M and ~110M transformers, full and LoRA, on CPU
    python benchmarks/ortho_overhead.py --sizes small --repeats 9
    python benchmarks/ortho_overhead.py --sizes "" --engine    # sft / aux / capvector through the training engine

For each model and finetuning mode it times, interleaved on one model so that machine load hits all alike:
`sft`, `fused` (backward, then reg.add_grad_), `autograd` (backward of task + lambda * reg.loss()) and `hard`
(reg.project_grad_ before and reg.project_ after the step). It prints median step times, their ratio to sft,
and the regularizer's own time measured alone (a steadier estimate of the overhead than a difference of
two noisy step times; reported as 1 + regularizer time / sft step time). Last line: RESULT key=value ...
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from capvector.training.orthogonal import build_regularizer

SIZES = {  # name: (vocab, width, layers, heads)
    "small": (1024, 256, 4, 4),  # ~3.4 M parameters
    "large": (32000, 768, 12, 12),  # ~110 M parameters
}


class Block(nn.Module):
    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads = heads
        self.norm1, self.norm2 = nn.LayerNorm(width), nn.LayerNorm(width)
        self.qkv, self.proj = nn.Linear(width, 3 * width), nn.Linear(width, width)
        self.fc, self.out = nn.Linear(width, 4 * width), nn.Linear(4 * width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, length, width = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(batch, length, 3, self.heads, -1).permute(2, 0, 3, 1, 4)
        attended = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(attended.transpose(1, 2).reshape(batch, length, width))
        return x + self.out(F.gelu(self.fc(self.norm2(x))))


class Transformer(nn.Module):
    """A GPT-style language model; forward returns the next-token loss."""

    def __init__(self, vocab: int, width: int, layers: int, heads: int, context: int = 256):
        super().__init__()
        self.embed, self.position = nn.Embedding(vocab, width), nn.Embedding(context, width)
        self.blocks = nn.ModuleList(Block(width, heads) for _ in range(layers))
        self.norm, self.head = nn.LayerNorm(width), nn.Linear(width, vocab, bias=False)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.embed(tokens[:, :-1]) + self.position.weight[: tokens.shape[1] - 1]
        for block in self.blocks:
            x = block(x)
        logits = self.head(self.norm(x))
        return F.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten())


def build_model(size: str, lora: bool, rank: int = 16) -> tuple[nn.Module, dict[str, torch.Tensor]]:
    """The model (PEFT-wrapped for LoRA) and a random capability vector for its base parameters."""
    torch.manual_seed(0)
    model = Transformer(*SIZES[size])
    gamma = {k: 1e-3 * torch.randn_like(v) for k, v in model.state_dict().items()}
    if lora:
        import peft

        config = peft.LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=["qkv", "proj", "fc", "out"])
        model = peft.get_peft_model(model, config)
    return model, gamma


def step_functions(model: nn.Module, reg, batch: torch.Tensor, weight: float = 10.0) -> dict[str, Callable[[], None]]:
    """One training step per variant, all on the same model and optimizer."""
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)

    def sft():
        optimizer.zero_grad(set_to_none=False)
        model(batch).backward()
        optimizer.step()

    def fused():
        optimizer.zero_grad(set_to_none=False)
        model(batch).backward()
        reg.add_grad_(weight)
        optimizer.step()

    def autograd():
        optimizer.zero_grad(set_to_none=False)
        (model(batch) + weight * reg.loss()).backward()
        optimizer.step()

    def hard():
        optimizer.zero_grad(set_to_none=False)
        model(batch).backward()
        reg.project_grad_()
        optimizer.step()
        reg.project_()

    return {"sft": sft, "fused": fused, "autograd": autograd, "hard": hard}


def time_interleaved(functions: dict[str, Callable[[], None]], repeats: int) -> dict[str, list[float]]:
    """Seconds per call for each round, the functions taking turns (after one warm-up round)."""
    times: dict[str, list[float]] = {name: [] for name in functions}
    for round_ in range(repeats + 1):
        for name, function in functions.items():
            start = time.perf_counter()
            function()
            if round_:
                times[name].append(time.perf_counter() - start)
    return times


def median_ratio(times: list[float], baseline: list[float]) -> float:
    """The median over rounds of time / baseline time in the same round (rounds share the machine's load)."""
    return statistics.median(t / b for t, b in zip(times, baseline))


def measure(size: str, lora: bool, repeats: int, batch_size: int, length: int, lora_form: str) -> dict[str, float]:
    model, gamma = build_model(size, lora)
    reg = build_regularizer(model, gamma, lora_form=lora_form)
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    batch = torch.randint(0, SIZES[size][0], (batch_size, length + 1), generator=torch.Generator().manual_seed(1))
    steps = time_interleaved(step_functions(model, reg, batch), repeats)
    alone = time_interleaved(
        {
            "add_grad_": lambda: reg.add_grad_(1.0),
            "loss+backward": lambda: reg.loss().backward(),
            "project_grad_+project_": lambda: (reg.project_grad_(), reg.project_()),
        },
        repeats,
    )
    sft = statistics.median(steps["sft"])
    ratios = {name: median_ratio(times, steps["sft"]) for name, times in steps.items()}
    mode = f"lora({lora_form})" if lora else "full"
    print(f"{size} {mode}: {total / 1e6:.1f} M parameters, {trainable / 1e6:.2f} M trained, {reg}")
    for name, times in steps.items():
        print(
            f"  {name:9s} {statistics.median(times) * 1e3:9.1f} ms/step  x{ratios[name]:.3f} "
            f"(rounds: {min(times) * 1e3:.0f}..{max(times) * 1e3:.0f} ms)"
        )
    for name, times in alone.items():
        seconds = statistics.median(times)
        print(f"  {name:22s} alone {seconds * 1e3:8.2f} ms = {100 * seconds / sft:.2f}% of an sft step")
    return {
        "fused": ratios["fused"],
        "autograd": ratios["autograd"],
        "hard": ratios["hard"],
        "fused_alone": 1 + statistics.median(alone["add_grad_"]) / sft,
        "autograd_alone": 1 + statistics.median(alone["loss+backward"]) / sft,
        "hard_alone": 1 + statistics.median(alone["project_grad_+project_"]) / sft,
    }


def engine_step_ms(config) -> float:
    """Median per-step wall time of a training run (log intervals after the first, so start-up is left out)."""
    import json

    from capvector.training.engine import train

    out = train(config)
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return statistics.median(1000 / r["steps_per_s"] for r in records[1:])


def measure_engine(workdir: str, steps: int, rounds: int, batch_size: int) -> dict[str, float]:
    """The three strategies through the training engine on the embedded benchmark's policy and demonstrations:
    per-step time of `aux` and `capvector` (full and LoRA) against `sft`, median over interleaved rounds."""
    import dataclasses
    from pathlib import Path

    from capvector.bench.env.demos import generate_demonstrations
    from capvector.params.vectors import extract
    from capvector.training.config import TrainConfig
    from capvector.training.engine import train

    work = Path(workdir)
    demos = work / "demos"
    if not demos.exists():
        generate_demonstrations(demos, "reach-v3,push-v3", episodes_per_task=4, workers=2)
    base = TrainConfig(
        policy="capvector.bench.recipe:policy",
        policy_args={"dataset": str(demos)},
        dataset="capvector.bench.recipe:dataset",
        dataset_args={"root": str(demos)},
        auxiliary="capvector.bench.recipe:spatial",
        auxiliary_args={"dataset": str(demos)},
        batch_size=batch_size,
        checkpoint_every=0,
        log_every=max(1, steps // 5),
        progress=False,
        tensorboard=False,
        time_parts=False,
        lr=1e-4,
    )
    start = work / "theta_pt"
    if not (start / "policy").exists():  # a starting point, and a real gamma from two short runs

        def run(name: str, **kw):
            return train(dataclasses.replace(base, out_dir=str(work / name), steps=4, **kw))

        run("theta_pt", strategy="sft")
        for strategy in ("sft", "aux"):
            run(f"extract_{strategy}", strategy=strategy, init_from=str(start / "policy"), policy_args={})
        extract(work / "extract_aux" / "policy", work / "extract_sft" / "policy", work / "gamma")
    # a hand-made gamma and a theta_pt start: no merge record to check (timing only)
    common = dict(
        init_from=str(start / "policy"), policy_args={}, steps=steps, vector=str(work / "gamma"), check_merge=False
    )
    variants = {
        f"{strategy}_{finetune}": dict(strategy=strategy, finetune=finetune, **common)
        for finetune in ("full", "lora")
        for strategy in ("sft", "aux", "capvector")
    }
    times: dict[str, list[float]] = {name: [] for name in variants}
    for round_ in range(rounds):
        for name, fields in variants.items():
            out = work / f"run_{name}_{round_}"
            times[name].append(engine_step_ms(dataclasses.replace(base, out_dir=str(out), **fields)))
    result = {}
    print(f"engine, benchmark policy, batch {batch_size}, {steps} steps x {rounds} rounds")
    for name, values in times.items():
        baseline = times["sft_" + name.split("_")[1]]
        ratio = median_ratio(values, baseline)
        result[f"engine_{name}_ms"], result[f"engine_{name}_vs_sft"] = statistics.median(values), ratio
        print(f"  {name:15s} {statistics.median(values):8.1f} ms/step  x{ratio:.3f}")
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", default="small,large")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--length", type=int, default=128)
    parser.add_argument("--lora-form", default="olora", choices=["olora", "exact"])
    parser.add_argument(
        "--threads",
        type=int,
        default=0,
        help="torch CPU threads (0: torch's default); on a "
        "machine shared with other jobs, 1 avoids OpenMP threads waiting on each other",
    )
    parser.add_argument(
        "--engine",
        action="store_true",
        help="also time sft/aux/capvector through the training "
        "engine on the embedded benchmark's policy (makes a few demonstrations first)",
    )
    parser.add_argument("--engine-steps", type=int, default=30)
    parser.add_argument("--engine-rounds", type=int, default=3)
    parser.add_argument("--engine-batch", type=int, default=32)
    parser.add_argument("--workdir", default="/tmp/capvector-ortho-bench")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, load average {os.getloadavg()[0]:.1f}, "
        f"batch {args.batch} x {args.length} tokens"
    )
    result = {}
    for size in filter(None, args.sizes.split(",")):
        for lora in (False, True):
            ratios = measure(size, lora, args.repeats, args.batch, args.length, args.lora_form)
            mode = "lora" if lora else "full"
            result.update({f"{size}_{mode}_{k}": v for k, v in ratios.items()})
    if args.engine:
        result.update(measure_engine(args.workdir, args.engine_steps, args.engine_rounds, args.engine_batch))
    print("RESULT " + " ".join(f"{k}={v:.4f}" for k, v in result.items()))


if __name__ == "__main__":
    main()
