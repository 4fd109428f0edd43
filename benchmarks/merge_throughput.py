"""Throughput and memory of `capvector extract` and `capvector merge` on synthetic Llama-shaped checkpoints.

Makes three bf16 checkpoints (pretrained, SFT, auxiliary) in the Hugging Face layout (sharded safetensors + index +
config.json), random weights, nothing downloaded; then, each in a fresh process so that peak RSS is its own:
  - extract: gamma = ao - ft; merge: pt + gamma;
  - the I/O floor of each: reading the same inputs and writing an output of the same size, no arithmetic;
  - mergekit's task_arithmetic (pt + (ao - pt) - (ft - pt), the same theta_meta) when mergekit is installed in a
    separate environment:  python3 -m venv .venv-mergekit && .venv-mergekit/bin/pip install torch==2.13.0 mergekit
    (torch first, so that pip does not pull a CUDA build), then pass --mergekit .venv-mergekit.
Before each measurement, earlier outputs are flushed (sync) and its inputs read once, so that every one of them,
ours and the floors alike, starts with its inputs in the page cache and no writeback pending.

  python benchmarks/merge_throughput.py [--layers 16 8] [--workdir /tmp/capvector-bench] [--mergekit .venv-mergekit]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

HIDDEN, INTERMEDIATE, VOCAB, KV_DIM = 2048, 5632, 32000, 256  # TinyLlama's shapes
SHARD_BYTES = 1 << 30


def llama_shapes(layers: int) -> dict[str, tuple[int, ...]]:
    shapes = {"model.embed_tokens.weight": (VOCAB, HIDDEN)}
    for i in range(layers):
        p = f"model.layers.{i}."
        shapes.update(
            {
                p + "self_attn.q_proj.weight": (HIDDEN, HIDDEN),
                p + "self_attn.k_proj.weight": (KV_DIM, HIDDEN),
                p + "self_attn.v_proj.weight": (KV_DIM, HIDDEN),
                p + "self_attn.o_proj.weight": (HIDDEN, HIDDEN),
                p + "mlp.gate_proj.weight": (INTERMEDIATE, HIDDEN),
                p + "mlp.up_proj.weight": (INTERMEDIATE, HIDDEN),
                p + "mlp.down_proj.weight": (HIDDEN, INTERMEDIATE),
                p + "input_layernorm.weight": (HIDDEN,),
                p + "post_attention_layernorm.weight": (HIDDEN,),
            }
        )
    shapes.update({"model.norm.weight": (HIDDEN,), "lm_head.weight": (VOCAB, HIDDEN)})
    return shapes


def write_model(folder: Path, shapes: dict, seed: int, layers: int) -> None:
    """A Llama checkpoint with weights base + 0.01 * noise(seed): the three models share the base (seed 0)."""
    folder.mkdir(parents=True)
    weight_map, shard, size, index = {}, {}, 0, 0

    def flush():
        nonlocal shard, size, index
        if shard:
            index += 1
            name = f"model-{index:05d}.safetensors"
            save_file(shard, folder / name, metadata={"format": "pt"})
            weight_map.update({k: name for k in shard})
            shard, size = {}, 0

    for i, (name, shape) in enumerate(shapes.items()):
        base = torch.randn(shape, generator=torch.Generator().manual_seed(i)).mul_(0.02)
        if seed:
            base.add_(torch.randn(shape, generator=torch.Generator().manual_seed(1000 * seed + i)), alpha=0.001)
        tensor = base.bfloat16()
        if size + tensor.nbytes > SHARD_BYTES:
            flush()
        shard[name] = tensor
        size += tensor.nbytes
    flush()
    count = index
    renamed = {}
    for i in range(1, count + 1):  # the usual model-0000i-of-0000n names, known only once the count is
        new = f"model-{i:05d}-of-{count:05d}.safetensors"
        (folder / f"model-{i:05d}.safetensors").rename(folder / new)
        renamed[f"model-{i:05d}.safetensors"] = new
    total = sum(2 * torch.Size(s).numel() for s in shapes.values())
    (folder / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": {k: renamed[v] for k, v in weight_map.items()}})
    )
    (folder / "config.json").write_text(
        json.dumps(
            {
                "architectures": ["LlamaForCausalLM"],
                "model_type": "llama",
                "hidden_size": HIDDEN,
                "intermediate_size": INTERMEDIATE,
                "num_hidden_layers": layers,
                "num_attention_heads": 32,
                "num_key_value_heads": 4,
                "vocab_size": VOCAB,
                "rms_norm_eps": 1e-5,
                "torch_dtype": "bfloat16",
                "tie_word_embeddings": False,
                "max_position_embeddings": 2048,
            }
        )
    )


# --- the operations, each run in a child process --------------------------------------------------------------------

CHILD = r"""
import sys, time, json, os
op, args = sys.argv[1], json.loads(sys.argv[2])
start = time.perf_counter()
if op == "extract":
    from capvector.params.vectors import extract
    extract(args["aux"], args["sft"], args["out"], hash_sources=args["hash"]).close()
elif op == "merge":
    from capvector.params.merging import merge
    merge(args["pt"], args["vector"], args["out"])
elif op == "floor":  # read every input file, write an output of the given size: no arithmetic, no parsing
    import threading
    def drain(paths):
        for path in paths:
            with open(path, "rb", buffering=0) as f:
                while f.read(16 << 20):
                    pass
    reader = threading.Thread(target=drain, args=(args["read_only"],))
    reader.start()
    os.makedirs(args["out"])
    for path in args["copy"]:
        target = os.path.join(args["out"], os.path.basename(path))
        with open(path, "rb", buffering=0) as src, open(target, "wb", buffering=0) as dst:
            while chunk := src.read(16 << 20):
                dst.write(chunk)
    reader.join()
seconds = time.perf_counter() - start
# VmHWM, not ru_maxrss: a child's ru_maxrss starts from its parent's resident size at fork
peak_kb = next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmHWM"))
print(json.dumps({"seconds": seconds, "peak_rss_gb": peak_kb / 2**20}))
"""


def settle(inputs: list[str]) -> None:
    """The same start for every measurement: earlier outputs flushed to disk, this one's inputs in the page cache."""
    os.sync()
    for path in inputs:
        with open(path, "rb", buffering=0) as f:
            while f.read(64 << 20):
                pass


def run_child(op: str, inputs: list[str], python: str = sys.executable, argv: list[str] | None = None, **args) -> dict:
    settle(inputs)
    command = argv or [python, "-c", CHILD, op, json.dumps(args)]
    begin = time.perf_counter()
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _, status, usage = os.wait4(process.pid, 0)
    elapsed = time.perf_counter() - begin
    out, err = process.stdout.read(), process.stderr.read()
    if os.waitstatus_to_exitcode(status) != 0:
        raise RuntimeError(f"{op} failed:\n{err[-3000:]}")
    if argv:  # an outside program (mergekit): its whole run, and ru_maxrss as the best available
        return {"seconds": elapsed, "wall_with_startup": elapsed, "peak_rss_gb": usage.ru_maxrss / 2**20}
    inner = json.loads(out.strip().splitlines()[-1])
    return {"seconds": inner["seconds"], "wall_with_startup": elapsed, "peak_rss_gb": inner["peak_rss_gb"]}


def weight_files(folder: Path) -> list[str]:
    return sorted(str(p) for p in folder.glob("*.safetensors"))


def bytes_of(paths) -> int:
    return sum(os.path.getsize(p) for p in paths)


def measure(workdir: Path, layers: int, mergekit: Path | None) -> dict:
    root = workdir / f"llama-{layers}l"
    shapes = llama_shapes(layers)
    params = sum(torch.Size(s).numel() for s in shapes.values())
    if not (root / "ao" / "config.json").exists():
        shutil.rmtree(root, ignore_errors=True)
        print(f"writing three {params / 1e9:.2f} B-parameter bf16 checkpoints to {root} ...", flush=True)
        for seed, name in enumerate(("pt", "ft", "ao")):
            write_model(root / name, shapes, seed, layers)
    out = Path(tempfile.mkdtemp(dir=workdir))
    result = {"layers": layers, "params_b": params / 1e9, "model_gb": bytes_of(weight_files(root / "pt")) / 1e9}

    def timed(label: str, op: str, moved: int, inputs: list[str], **args) -> None:
        run = run_child(op, inputs, **args)
        run["gb_per_s"] = moved / run["seconds"] / 1e9
        result[label] = run
        print(
            f"  {label:<16} {run['seconds']:6.2f} s  {run['gb_per_s']:5.2f} GB/s  peak RSS {run['peak_rss_gb']:.2f} GB",
            flush=True,
        )

    ao, ft, pt = weight_files(root / "ao"), weight_files(root / "ft"), weight_files(root / "pt")
    moved = bytes_of(ao) + bytes_of(ft) + bytes_of(ao)  # read two models, write one of the same size
    print(f"{layers} layers, {result['params_b']:.2f} B parameters, {result['model_gb']:.2f} GB per model")
    timed("extract_floor", "floor", moved, ao + ft, read_only=ft, copy=ao, out=str(out / "floor_extract"))
    for name, folder, hashed in (("extract", "gamma", False), ("extract_hashed", "gamma_h", True)):
        sources = dict(aux=str(root / "ao"), sft=str(root / "ft"), out=str(out / folder), hash=hashed)
        timed(name, "extract", moved, ao + ft, **sources)
    gamma = weight_files(out / "gamma")
    moved = bytes_of(pt) + bytes_of(gamma) + bytes_of(pt)
    timed("merge_floor", "floor", moved, pt + gamma, read_only=gamma, copy=pt, out=str(out / "floor_merge"))
    timed("merge", "merge", moved, pt + gamma, pt=str(root / "pt"), vector=str(out / "gamma"), out=str(out / "meta"))
    if mergekit:
        config = out / "mergekit.yml"
        config.write_text(
            f"merge_method: task_arithmetic\nbase_model: {root / 'pt'}\ndtype: bfloat16\nmodels:\n"
            f"  - model: {root / 'ao'}\n    parameters: {{weight: 1.0}}\n"
            f"  - model: {root / 'ft'}\n    parameters: {{weight: -1.0}}\n"
        )
        argv = [str(mergekit / "bin" / "mergekit-yaml"), str(config), str(out / "mergekit_out"), "--lazy-unpickle"]
        timed("mergekit", "mergekit", moved, pt + ao + ft, argv=argv)
        check = subprocess.run(
            [
                sys.executable,
                "-c",
                (
                    "import sys, torch; from capvector.params.checkpoints import open_checkpoint as o;"
                    "a, b = o(sys.argv[1]), o(sys.argv[2]); n = 'model.layers.0.mlp.up_proj.weight';"
                    "print(float((a[n].float() - b[n].float()).abs().max()))"
                ),
                str(out / "meta"),
                str(out / "mergekit_out"),
            ],
            capture_output=True,
            text=True,
        )
        result["mergekit_max_abs_difference"] = check.stdout.strip()
    shutil.rmtree(out)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--layers", type=int, nargs="+", default=[16, 8], help="model sizes (16 layers = 0.84 B params)"
    )
    parser.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "capvector-bench")
    parser.add_argument("--mergekit", type=Path, help="a virtualenv with mergekit installed")
    parser.add_argument("--keep", action="store_true", help="keep the synthetic checkpoints for the next run")
    args = parser.parse_args()
    args.workdir.mkdir(parents=True, exist_ok=True)
    if args.mergekit is None and Path(".venv-mergekit/bin/mergekit-yaml").exists():
        args.mergekit = Path(".venv-mergekit")
    if args.mergekit is None:
        print("mergekit: not compared (make its environment as the docstring says, then pass --mergekit DIR)")
    results = [measure(args.workdir, layers, args.mergekit) for layers in args.layers]
    if not args.keep:
        for layers in args.layers:
            shutil.rmtree(args.workdir / f"llama-{layers}l", ignore_errors=True)
    big = results[0]
    figures = {
        "params_b": round(big["params_b"], 3),
        "model_gb": round(big["model_gb"], 3),
        "extract_s": round(big["extract"]["seconds"], 2),
        "extract_hashed_s": round(big["extract_hashed"]["seconds"], 2),
        "extract_floor_s": round(big["extract_floor"]["seconds"], 2),
        "extract_vs_floor": round(big["extract_floor"]["seconds"] / big["extract"]["seconds"], 3),
        "merge_s": round(big["merge"]["seconds"], 2),
        "merge_gb_s": round(big["merge"]["gb_per_s"], 2),
        "merge_floor_s": round(big["merge_floor"]["seconds"], 2),
        "merge_vs_floor": round(big["merge_floor"]["seconds"] / big["merge"]["seconds"], 3),
        "extract_peak_rss_gb": round(big["extract"]["peak_rss_gb"], 2),
        "merge_peak_rss_gb": round(big["merge"]["peak_rss_gb"], 2),
    }
    for other in results[1:]:
        figures[f"merge_peak_rss_gb_{other['params_b']:.2f}b"] = round(other["merge"]["peak_rss_gb"], 2)
        figures[f"extract_peak_rss_gb_{other['params_b']:.2f}b"] = round(other["extract"]["peak_rss_gb"], 2)
    if "mergekit" in big:
        figures["mergekit_s"] = round(big["mergekit"]["wall_with_startup"], 2)
        figures["merge_speedup_vs_mergekit"] = round(
            big["mergekit"]["wall_with_startup"] / big["merge"]["wall_with_startup"], 2
        )
        figures["mergekit_max_abs_difference"] = big["mergekit_max_abs_difference"]
    print("RESULT " + " ".join(f"{k}={v}" for k, v in figures.items()))


if __name__ == "__main__":
    main()
