"""Memory per GPU of a training run, from its sizes: whether DDP, FSDP or LoRA fits, before anything is launched.

    training_memory(7e9, gpus=8, fsdp=True, gamma_parameters=7e9, ...).total     # bytes per GPU
    python -m capvector.training.memory                                          # the README's table (7B VLA)

The formulas count what the engine keeps (tests/test_memory.py checks them against a built run):

- weights in their own dtype (as the policy loads them). bf16 autocast computes in bf16 without keeping a
  second, master copy, so for mixed precision keep the weights in float32 (weight_bytes 4);
- one gradient per trained weight, and AdamW's two moments (exp_avg, exp_avg_sq), in the weight's dtype;
- gamma (strategy capvector) for every regularized tensor, in the dtype of what it regularizes: the weights
  (full finetuning) or the adapters (LoRA: gamma of each adapted layer, whole);
- FSDP divides weights, gradients, moments and gamma by the number of GPUs and all-gathers the rest as it
  runs: the root unit's weights for the whole step (FSDP2 keeps the root gathered between forward and
  backward), the running block's and the prefetched next block's weights, and the running block's gradients
  until they are reduce-scattered;
- LoRA: the frozen base whole on every GPU, plus the adapters, their gradients and moments (adapter_bytes:
  PEFT keeps them in float32 on a bf16 base).

Activations are an input: they depend on the batch, the sequence length and activation_checkpointing. Left
out as small: O-LoRA's subspace bases (a few columns per adapted layer), buffers, the auxiliary projector.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import astuple, dataclass

GB = 1e9


@dataclass(frozen=True)
class Memory:
    """Bytes per GPU."""

    weights: float
    gradients: float
    optimizer: float
    gamma: float
    gathered: float  # FSDP's all-gathered units
    activations: float

    @property
    def total(self) -> float:
        return self.weights + self.gradients + self.optimizer + self.gamma + self.gathered + self.activations


def training_memory(
    parameters: float,
    *,
    gpus: int = 1,
    fsdp: bool = False,
    weight_bytes: int = 4,
    gamma_parameters: float = 0,
    lora_parameters: float = 0,
    adapter_bytes: int = 4,
    block_parameters: float = 0,
    root_parameters: float = 0,
    activations: float = 0,
) -> Memory:
    """Bytes per GPU of a run over a model of `parameters` weights: full finetuning (lora_parameters 0) under
    DDP or (fsdp) sharded over `gpus`, or LoRA with that many adapter weights on a frozen base. gamma_parameters:
    the regularized tensors' size (0 for sft and aux). block_parameters, root_parameters: the largest block and
    the root unit (what no block holds) that FSDP all-gathers."""
    if lora_parameters:
        if fsdp:
            raise ValueError("LoRA runs under DDP only (capvector.training.preflight refuses LoRA with FSDP)")
        adapters = lora_parameters * adapter_bytes
        return Memory(
            weights=parameters * weight_bytes + adapters,
            gradients=adapters,
            optimizer=2 * adapters,
            gamma=gamma_parameters * adapter_bytes,
            gathered=0,
            activations=activations,
        )
    shards = gpus if fsdp else 1
    weights = parameters * weight_bytes / shards
    gathered = (root_parameters + 3 * block_parameters) * weight_bytes if fsdp and gpus > 1 else 0
    return Memory(
        weights=weights,
        gradients=weights,
        optimizer=2 * weights,
        gamma=gamma_parameters * weight_bytes / shards,
        gathered=gathered,
        activations=activations,
    )


def lora_parameters(shapes: Iterable[tuple[int, int]], rank: int) -> int:
    """Adapter weights of LoRA of `rank` on linear layers of these (out, in) shapes: A is rank x in, B out x rank."""
    return sum(rank * (rows + columns) for rows, columns in shapes)


# ---- the README's example: a 7B VLA ------------------------------------------------------------------------

# A Llama-2-7B-shaped language model (32 layers of hidden size 4096 and MLP size 11008; embeddings and output
# head over 32000 tokens) with vision encoders, 7.0 B parameters in all; LoRA of rank 32 on its 7 linear
# layers per block (q, k, v, o, gate, up, down), where gamma is regularized.
LAYERS, HIDDEN, MLP, VOCABULARY, PARAMETERS, RANK = 32, 4096, 11008, 32000, 7.0e9, 32
LINEARS = [(HIDDEN, HIDDEN)] * 4 + [(MLP, HIDDEN)] * 2 + [(HIDDEN, MLP)]  # (out, in)
ADAPTED = LAYERS * sum(rows * columns for rows, columns in LINEARS)
BLOCK = sum(rows * columns for rows, columns in LINEARS)
ROOT = 2 * VOCABULARY * HIDDEN  # embeddings and head


def examples() -> dict[str, Memory]:
    """The 7B VLA's settings shown in the README."""
    return {
        "full finetuning, DDP, 8 GPUs (float32 weights)": training_memory(
            PARAMETERS, gamma_parameters=PARAMETERS, gpus=8
        ),
        "full finetuning, FSDP, 8 GPUs (float32 weights)": training_memory(
            PARAMETERS, gamma_parameters=PARAMETERS, gpus=8, fsdp=True, block_parameters=BLOCK, root_parameters=ROOT
        ),
        f"LoRA rank {RANK}, 1 GPU (bf16 base, float32 adapters)": training_memory(
            PARAMETERS,
            weight_bytes=2,
            gamma_parameters=ADAPTED,
            lora_parameters=lora_parameters(LINEARS * LAYERS, RANK),
        ),
    }


def table() -> str:
    """examples() as the README's Markdown table, in GB (10^9 bytes) per GPU."""
    lines = [
        "| strategy capvector, 7B VLA | weights | gradients | AdamW moments | gamma | FSDP gathered "
        "| total before activations |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, memory in examples().items():
        values = (*astuple(memory)[:5], memory.total)
        lines.append(f"| {name} | " + " | ".join(f"{value / GB:.1f}" for value in values) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    print(table())
