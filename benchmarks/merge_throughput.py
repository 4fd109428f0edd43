"""Throughput and memory of `capvector extract` and `capvector merge` on synthetic Llama-shaped checkpoints.

Makes three bf16 checkpoints (pretrained, SFT, auxiliary) in the Hugging Face layout (sharded safetensors + index +
config.json), random weights, nothing downloaded; then, in `--runs` rounds, each measurement in a fresh process so
that peak RSS is its own, after a discarded warm-up round (--warmup):
  - extract: gamma = ao - ft (stored in float32, exact); merge: pt + gamma;
  - the I/O floor of each: reading the same inputs once and writing as many bytes as the output, no arithmetic, with
    the fastest plain copy loop found on the test machine (reads into reused 256 KB buffers, writes past the page
    cache from two aligned 8 MB buffers in turn, as capvector writes);
  - mergekit's task_arithmetic (pt + (ao - pt) - (ft - pt) in float32, rounded once to bf16; the elements where it
    differs from ours are counted) when mergekit is installed in a separate environment:
      python3 -m venv .venv-mergekit && .venv-mergekit/bin/pip install torch==2.13.0
      .venv-mergekit/bin/pip install mergekit==0.1.5
    (torch first, so that pip does not pull a CUDA build), then pass --mergekit .venv-mergekit.
Before each measurement, earlier outputs are flushed (sync) and dropped from the page cache, its inputs read once,
and as much fresh memory as it will fill (its output, and its own memory) touched and freed, so that every one of
them, ours and the floors alike, starts with its inputs in the page cache, no writeback pending and free memory
that the host backs. On a virtual machine that reports free memory to its host (virtio-balloon free page
reporting, as on the project's machine), a page handed out after it was reported costs a host fault: a copy into
such memory took 11-13 s where the same copy into memory touched just before took 2-6 s. How much was reported while
each measurement worked is printed where the kernel says it (reported MiB). The floor still swings (0.8-4 s for the
same copy with nothing reported: README, Benchmarks). The operation and its floor take turns going first. Times exclude
the 1-5 s that importing torch takes (reported apart as import_s); the mergekit comparison uses whole process times
on both sides.

  python benchmarks/merge_throughput.py [--layers 16 8] [--runs 3] [--warmup 1] [--workdir DIR] [--mergekit DIR]
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
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

# Touch `nbytes` of fresh memory and free it: the free memory the next allocations take is then memory the host
# backs (see the module's docstring).
TOUCH = r"""
import os
REPORTED = "/sys/module/page_reporting/parameters/reported_kib"  # where this machine's kernel counts it

def reported_kib():
    '''KiB of free memory the kernel has reported to the host so far (None where it does not say).'''
    return int(open(REPORTED).read()) if os.path.exists(REPORTED) else None

def touch(nbytes):
    import mmap
    block, page = mmap.mmap(-1, nbytes), b"\1" * (1 << 20)
    for _ in range(nbytes >> 20):
        block.write(page)
    block.close()
"""

CHILD = (
    TOUCH
    + r"""
import sys, time, json, os
op, args = sys.argv[1], json.loads(sys.argv[2])
began = time.perf_counter()
if op != "floor":  # importing torch takes 1-5 s, with the machine's load: timed apart from the work
    from capvector.params.vectors import extract
    from capvector.params.merging import merge
    from capvector.params.streaming import retain_freed_memory
    retain_freed_memory()  # as the commands do
imported = time.perf_counter()
# Right before the work, not before the process: the host takes back reported memory within seconds.
touch(args.pop("hot_bytes"))
with open("/proc/self/clear_refs", "w") as f:  # peak RSS (VmHWM) back to the current RSS: the touch is not the work
    f.write("5")
start, cpu_start, reported = time.perf_counter(), os.times(), reported_kib()
if op == "extract":
    extract(args["aux"], args["sft"], args["out"], hash_sources=args["hash"]).close()
elif op == "merge":
    merge(args["pt"], args["vector"], args["out"])
elif op == "floor":  # read every input once, write `copies` times the bytes of `copy`: no arithmetic, no parsing
    # The fastest plain copy found on the test machine, so that the floor is a hard one: reads into reused 256 KB
    # buffers, writes past the page cache (O_DIRECT) from two page-aligned buffers in turn, a thread writing one while
    # the other is filled, as capvector writes (buffered writes swung from 0.5 to 7 s per GB there; block sizes other
    # than 8 MB not tried with direct writes); the last block padded and then cut off.
    import mmap, threading
    from concurrent.futures import ThreadPoolExecutor
    READ_BLOCK, WRITE_BLOCK, ALIGN = 256 << 10, 8 << 20, 4096
    def drain(paths):
        buffer = bytearray(READ_BLOCK)
        for path in paths:
            with open(path, "rb", buffering=0) as f:
                while f.readinto(buffer):
                    pass
    reader = threading.Thread(target=drain, args=(args["read_only"],))
    reader.start()
    os.makedirs(args["out"])
    buffers, writes = [memoryview(mmap.mmap(-1, WRITE_BLOCK)) for _ in range(2)], [None, None]
    def write_out(fd, view):
        for _ in range(args["copies"]):
            os.write(fd, view)
    with ThreadPoolExecutor(1) as writer:
        for path in args["copy"]:  # each block written `copies` times: one file of the output's size per input file
            target = os.path.join(args["out"], os.path.basename(path))
            fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_DIRECT, 0o644)
            with open(path, "rb", buffering=0) as src:
                written, turn = 0, 0
                while True:
                    if writes[turn] is not None:
                        writes[turn].result()
                    size = src.readinto(buffers[turn])
                    if not size:
                        break
                    padded = -(-size // ALIGN) * ALIGN  # below WRITE_BLOCK only at the end of the file
                    writes[turn] = writer.submit(write_out, fd, buffers[turn][:padded])
                    written += size * args["copies"]
                    turn = 1 - turn
            for turn in (0, 1):
                if writes[turn] is not None:
                    writes[turn].result()
                    writes[turn] = None
            os.ftruncate(fd, written)
            os.close(fd)
    reader.join()
seconds = time.perf_counter() - start
cpu = [now - then for now, then in zip(os.times(), cpu_start)]  # user and system time of the work, all threads
# VmHWM, not ru_maxrss: a child's ru_maxrss starts from its parent's resident size at fork
peak_kb = next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmHWM"))
figures = {"seconds": seconds, "import_s": imported - began, "cpu_s": cpu[0] + cpu[1], "peak_rss_gb": peak_kb / 2**20}
figures["reported_mib"] = None if reported is None else (reported_kib() - reported) / 1024
print(json.dumps(figures))
"""
)


# Memory a measurement fills besides its output, touched before it: our processes and the floor stay under 0.4 GB,
# mergekit's peaks at 4.2-4.4 GB.
OWN_MEMORY = {"mergekit": 5 << 30}
OWN_MEMORY_DEFAULT = 1 << 30


def settle(inputs: list[str]) -> None:
    """The same start for every measurement: earlier outputs flushed to disk, this one's inputs in the page cache."""
    os.sync()
    for path in inputs:
        with open(path, "rb", buffering=0) as f:
            while f.read(64 << 20):
                pass


def run_child(
    op: str, inputs: list[str], written: int, python: str = sys.executable, argv: list[str] | None = None, **args
) -> dict:
    """Run `op` in a fresh process, which writes `written` bytes, as much fresh memory as it fills touched first;
    its timings (ours with the MiB of free memory the kernel reported to the host while it worked, where it says)."""
    settle(inputs)
    hot_bytes = written + OWN_MEMORY.get(op, OWN_MEMORY_DEFAULT)
    if argv:  # an outside program: touched by a process of its own (ours would keep the touch in its peak RSS)
        subprocess.run([python, "-c", TOUCH + "import sys; touch(int(sys.argv[1]))", str(hot_bytes)], check=True)
    command = argv or [python, "-c", CHILD, op, json.dumps(args | {"hot_bytes": hot_bytes})]
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:  # pipes could fill and block
        begin = time.perf_counter()
        process = subprocess.Popen(command, stdout=out, stderr=err, text=True)
        _, status, usage = os.wait4(process.pid, 0)
        elapsed = time.perf_counter() - begin
        out.seek(0)
        err.seek(0)
        stdout, stderr = out.read(), err.read()
    if os.waitstatus_to_exitcode(status) != 0:
        raise RuntimeError(f"{op} failed:\n{stderr[-3000:]}")
    if argv:  # an outside program (mergekit): its whole run, and ru_maxrss as the best available
        return {"seconds": elapsed, "wall_with_startup": elapsed, "peak_rss_gb": usage.ru_maxrss / 2**20}
    inner = json.loads(stdout.strip().splitlines()[-1])
    return {**inner, "wall_with_startup": elapsed}


def weight_files(folder: Path) -> list[str]:
    return sorted(str(p) for p in folder.glob("*.safetensors"))


def bytes_of(paths) -> int:
    return sum(os.path.getsize(p) for p in paths)


def time_into(
    timings: dict, round_: str, label: str, op: str, moved: int, written: int, inputs: list[str], **args
) -> None:
    """Run `op`, store its timing under `label` in `timings` and print it; `moved` is the bytes read and written,
    `written` those written.
    Its output is removed at once, or with `keep` evicted from the page cache, so that every measurement starts with
    as much free memory: one that runs while an earlier one's output fills the page cache pays for reclaiming it."""
    keep = args.pop("keep", False)
    run = run_child(op, inputs, written, **args)
    run["gb_per_s"] = moved / run["seconds"] / 1e9
    timings[label] = run
    startup = f"  (+{run['import_s']:.1f} s import)" if run.get("import_s", 0) > 0.05 else ""
    reported = "" if run.get("reported_mib") is None else f"  reported {run['reported_mib']:.0f} MiB"
    print(
        f"  run {round_}  {label:<15} {run['seconds']:6.2f} s  {run['gb_per_s']:5.2f} GB/s  "
        f"peak RSS {run['peak_rss_gb']:.2f} GB"
        + (f"  CPU {run['cpu_s']:.1f} s" if "cpu_s" in run else "")
        + startup
        + reported,
        flush=True,
    )
    if "out" in args and keep:
        evict(Path(args["out"]))
    elif "out" in args:
        shutil.rmtree(args["out"])


def evict(folder: Path) -> None:
    """Drop the files under `folder` from the page cache (written back first)."""
    os.sync()
    for path in folder.rglob("*"):
        if path.is_file():
            fd = os.open(path, os.O_RDONLY)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            os.close(fd)


def in_turn(timed: Callable[..., None], round_: int, *measurements: tuple[str, str, int, int, list[str], dict]) -> None:
    """Time the floor and the operation one after the other: the floor first in odd rounds, second in even ones."""
    for label, op, moved, written, inputs, args in measurements if round_ % 2 else measurements[::-1]:
        timed(label, op, moved, written, inputs, **args)


def measure(workdir: Path, layers: int, mergekit: Path | None, runs: int, warmup: int) -> dict:
    """`runs` rounds, each timing every operation and its floor one after the other, the floor first in odd rounds
    and second in even ones, so that neither side of a ratio is favoured by the machine's state or load; after
    `warmup` rounds that are discarded (without mergekit): the first measurements of a process tree on a fresh
    virtual machine pay the kernel for memory it never touched before (seen: extract's system time 6.6 s in its
    first round, 1.7 s by its third), and the floor, which went first, paid most of it."""
    root = workdir / f"llama-{layers}l"
    shapes = llama_shapes(layers)
    params = sum(torch.Size(s).numel() for s in shapes.values())
    if not (root / "ao" / "config.json").exists():
        shutil.rmtree(root, ignore_errors=True)
        print(f"writing three {params / 1e9:.2f} B-parameter bf16 checkpoints to {root} ...", flush=True)
        for seed, name in enumerate(("pt", "ft", "ao")):
            write_model(root / name, shapes, seed, layers)
    ao, ft, pt = weight_files(root / "ao"), weight_files(root / "ft"), weight_files(root / "pt")
    result: dict = {"layers": layers, "params_b": params / 1e9, "model_gb": bytes_of(pt) / 1e9, "runs": []}
    print(f"{layers} layers, {result['params_b']:.2f} B parameters, {result['model_gb']:.2f} GB per model")
    for number in range(1 - warmup, runs + 1):  # the warm-up rounds are numbered 0, -1, ...
        round_ = str(number) if number > 0 else "warm-up"
        out = Path(tempfile.mkdtemp(dir=workdir))
        timings: dict = {}
        timed = functools.partial(time_into, timings, round_)

        sources = {"aux": str(root / "ao"), "sft": str(root / "ft")}
        written = 2 * bytes_of(ao)  # gamma is float32 (exact): twice a bf16 model
        moved = bytes_of(ao) + bytes_of(ft) + written
        in_turn(
            timed,
            number,
            (
                "extract_floor",
                "floor",
                moved,
                written,
                ao + ft,
                {"read_only": ft, "copy": ao, "copies": 2, "out": str(out / "f")},
            ),
            (
                "extract",
                "extract",
                moved,
                written,
                ao + ft,
                {**sources, "out": str(out / "g"), "hash": False, "keep": True},
            ),
        )
        timed("extract_hashed", "extract", moved, written, ao + ft, **sources, out=str(out / "gh"), hash=True)
        gamma = weight_files(out / "g")
        written = bytes_of(pt)
        moved = bytes_of(pt) + bytes_of(gamma) + written
        merged = {"pt": str(root / "pt"), "vector": str(out / "g"), "out": str(out / "meta"), "keep": True}
        in_turn(
            timed,
            number,
            (
                "merge_floor",
                "floor",
                moved,
                written,
                pt + gamma,
                {"read_only": gamma, "copy": pt, "copies": 1, "out": str(out / "f")},
            ),
            ("merge", "merge", moved, written, pt + gamma, merged),
        )
        if mergekit and number > 0:
            config = out / "mergekit.yml"
            config.write_text(
                # arithmetic in float32, rounded once to bfloat16: the same theta_meta as ours, bit for bit
                f"merge_method: task_arithmetic\nbase_model: {root / 'pt'}\ndtype: float32\nout_dtype: bfloat16\n"
                "models:\n"
                f"  - model: {root / 'ao'}\n    parameters: {{weight: 1.0}}\n"
                f"  - model: {root / 'ft'}\n    parameters: {{weight: -1.0}}\n"
            )
            shutil.rmtree(out / "g")  # mergekit starts from the models, as extract did
            argv = [str(mergekit / "bin" / "mergekit-yaml"), str(config), str(out / "mergekit_out"), "--lazy-unpickle"]
            timed("mergekit", "mergekit", moved, written, pt + ao + ft, argv=argv)
            timings["mergekit_mismatched_elements"] = compare(out / "meta", out / "mergekit_out")
        if number > 0:
            result["runs"].append(timings)
        shutil.rmtree(out)
    return result


def compare(ours: Path, theirs: Path) -> int:
    """How many elements of the two merged models differ, bit for bit (in a child: this process stays torch-light)."""
    script = (
        "import sys, torch; from capvector.params.checkpoints import open_checkpoint as o\n"
        "a, b = o(sys.argv[1]), o(sys.argv[2])\n"
        "print(sum(int((a[n].view(torch.int16) != b[n].view(torch.int16)).sum()) for n in a))"
    )
    check = subprocess.run([sys.executable, "-c", script, str(ours), str(theirs)], capture_output=True, text=True)
    if check.returncode:
        raise RuntimeError(check.stderr[-3000:])
    return int(check.stdout)


def spread(values: list[float], digits: int = 2) -> str:
    """'median (run 1, run 2, ...)'."""
    return f"{round(statistics.median(values), digits)} ({', '.join(str(round(v, digits)) for v in values)})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--layers", type=int, nargs="+", default=[16, 8], help="model sizes (16 layers = 0.84 B params)"
    )
    parser.add_argument("--runs", type=int, default=3, help="rounds of every measurement (default 3)")
    parser.add_argument("--warmup", type=int, default=1, help="rounds run first and discarded (default 1)")
    parser.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "capvector-bench")
    parser.add_argument("--mergekit", type=Path, help="a virtualenv with mergekit installed")
    parser.add_argument("--keep", action="store_true", help="keep the synthetic checkpoints for the next run")
    args = parser.parse_args()
    args.workdir.mkdir(parents=True, exist_ok=True)
    if args.mergekit is None and Path(".venv-mergekit/bin/mergekit-yaml").exists():
        args.mergekit = Path(".venv-mergekit")
    if args.mergekit is None:
        print("mergekit: not compared (make its environment as the docstring says, then pass --mergekit DIR)")
    print(f"load average at start: {os.getloadavg()}")
    results = [measure(args.workdir, layers, args.mergekit, args.runs, args.warmup) for layers in args.layers]
    print(f"load average at end: {os.getloadavg()}")
    if not args.keep:
        for layers in args.layers:
            shutil.rmtree(args.workdir / f"llama-{layers}l", ignore_errors=True)
    for result in results:
        print(f"RESULT {result['params_b']:.2f}B " + "  ".join(f"{k}={v}" for k, v in summary(result).items()))


def summary(result: dict) -> dict:
    """Per figure: the median over the runs, then every run."""
    runs = result["runs"]

    def each(label: str, key: str = "seconds") -> list[float]:
        return [run[label][key] for run in runs]

    def ratios(numerator: str, denominator: str, key: str = "seconds") -> list[float]:
        return [run[numerator][key] / run[denominator][key] for run in runs]

    figures = {
        "params_b": round(result["params_b"], 3),
        "model_gb": round(result["model_gb"], 3),
        "extract_s": spread(each("extract")),
        "extract_floor_s": spread(each("extract_floor")),
        "extract_vs_floor": spread(ratios("extract_floor", "extract"), 3),
        "extract_hashed_s": spread(each("extract_hashed")),
        "merge_s": spread(each("merge")),
        "merge_floor_s": spread(each("merge_floor")),
        "merge_vs_floor": spread(ratios("merge_floor", "merge"), 3),
        "import_s": spread(each("extract", "import_s") + each("merge", "import_s")),
        "extract_cpu_s": spread(each("extract", "cpu_s")),
        "extract_floor_cpu_s": spread(each("extract_floor", "cpu_s")),
        "merge_cpu_s": spread(each("merge", "cpu_s")),
        "merge_floor_cpu_s": spread(each("merge_floor", "cpu_s")),
        "extract_peak_rss_gb": spread(each("extract", "peak_rss_gb")),
        "merge_peak_rss_gb": spread(each("merge", "peak_rss_gb")),
    }
    if runs[0]["extract"]["reported_mib"] is not None:  # free memory reported to the host while each ran
        for label in ("extract", "extract_floor", "merge", "merge_floor"):
            figures[f"{label}_reported_mib"] = spread(each(label, "reported_mib"), 0)
    if "mergekit" in runs[0]:
        figures["mergekit_s"] = spread(each("mergekit", "wall_with_startup"))
        figures["merge_with_startup_s"] = spread(each("merge", "wall_with_startup"))
        figures["mergekit_vs_merge"] = spread(ratios("mergekit", "merge", "wall_with_startup"))
        figures["mergekit_mismatched_elements"] = [run["mergekit_mismatched_elements"] for run in runs]
    return figures


if __name__ == "__main__":
    main()
