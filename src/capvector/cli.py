"""The `capvector` command: a thin layer over the Python API (each command is one call there)."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time
from collections.abc import Iterator, Sequence
from typing import Any

from capvector.errors import CapvectorError

EXAMPLES = {
    "extract": """example:
  capvector extract --aux runs/aux --sft runs/sft -o gamma --exclude 'action_head.*'
  capvector extract --aux runs/aux_lora --sft runs/sft_lora --pretrained base -o gamma --rank 64""",
    "merge": """example:
  capvector merge --pretrained base -o base_meta --vector gamma --alpha 1.0 --alpha 'model.layers.0.*=0.5'""",
    "inspect": """example:
  capvector inspect gamma --against tau --base base --plot gamma.png""",
    "train": """example:
  capvector train --config run.yaml --set strategy=aux --set steps=2000
  capvector train --config run.yaml --set strategy=capvector --set init_from=base_meta --set vector=gamma
  torchrun --nproc_per_node 2 -m capvector.training --config run.yaml        (many processes, DDP)""",
    "tasks": """example:
  capvector tasks --split downstream""",
    "demos": """example:
  capvector demos -o data/pretrain --tasks pretrain --episodes 50
  capvector demos -o data/two --tasks reach-v3,push-v3 --episodes 5 --workers 2
  capvector demos -o data/frames --tasks pretrain --episodes 40 --frame-stride 4   # frames for a teacher""",
    "evaluate": """example:
  capvector evaluate runs/sft/policy --tasks downstream --episodes 20 --gifs runs/sft/gifs
  capvector evaluate runs/sft/policy --variant new_env --json results.json
  capvector evaluate --expert --tasks reach-v3,push-v3 --episodes 10""",
    "headroom": """example:
  capvector headroom --regime wide        (SFT against an oracle given object positions; runs/headroom/wide/report)
  capvector headroom --regime default     (the same in Meta-World's own placement ranges)
  capvector headroom --regime views-scan  (which tasks gain from positions when the camera moves? validation placements)
  capvector headroom --regime views-picked --arms sft,oracle,control   (the four chosen, 5 seeds, the control too)
  capvector headroom --regime views-confirm --arms sft,oracle,control,teacher   (with the 3D teacher's objective)
  capvector headroom --regime views-confirm-shift --arms sft,oracle,control   (all arms on shifted images)""",
    "reproduce": """example:
  capvector reproduce --preset quick                       (what `make demo` runs; minutes on a laptop CPU)
  capvector reproduce --preset full --device cuda
  capvector reproduce --preset quick --force downstream    (redo a stage and the ones after it)
  capvector reproduce --preset quick --objective privileged --placement wide --variant random_view
      (another regime, in its own folder runs/reproduce/quick-privileged-wide-random_view)""",
}


@contextlib.contextmanager
def _file_errors() -> Iterator[None]:
    """An operating-system error on a path the user gave (permissions, a file where a folder should be, a read-only
    disk) is a bad input too: one line, exit 2."""
    try:
        yield
    except OSError as error:
        where = f"{error.filename}: " if error.filename else ""
        raise CapvectorError(f"{where}{error.strerror or error}; check the path and its permissions") from None


class _FieldsHelp(argparse.Action):
    """`train -h`: the usual help, then every config field with its default and meaning (from TrainConfig's
    comments; imported only when asked, since it loads torch)."""

    def __init__(self, option_strings: Sequence[str], dest: str, **kwargs) -> None:
        kwargs |= {"nargs": 0, "default": argparse.SUPPRESS, "help": "show this help, with every config field"}
        super().__init__(option_strings, argparse.SUPPRESS, **kwargs)

    def __call__(self, parser, namespace, values, option_string=None) -> None:
        from capvector.training.config import describe_fields

        parser.print_help()
        print()
        print(describe_fields())
        parser.exit()


def _progress(line: str) -> None:
    """Progress (tasks as they finish; training's steps) goes to stderr, stdout keeps what a command reports at the
    end."""
    print(line, file=sys.stderr, flush=True)


def _command_extract(args: argparse.Namespace) -> None:
    from capvector.params.streaming import retain_freed_memory
    from capvector.params.vectors import extract

    retain_freed_memory()
    with _file_errors():
        vector = extract(
            args.aux,
            args.sft,
            args.output,
            pretrained=args.pretrained,
            include=args.include,
            exclude=args.exclude,
            dtype=args.dtype,
            rank=args.rank,
            task_vector_output=args.task_vector,
            hash_sources=not args.no_hash,
        )
    metadata = vector.metadata
    skipped = {k: len(v) for k, v in metadata.get("skipped", {}).items() if v}
    truncation = metadata.get("global_lowrank_relative_error")
    print(
        f"wrote {args.output}: {len(vector)} tensors in {metadata['dtype']}, |gamma| = {metadata['global_norm']:.6g}"
        + (f" as stored at rank {args.rank} (relative error {truncation:.3g})" if truncation is not None else "")
        + (f"; skipped {skipped}" if skipped else "")
    )
    if metadata.get("rounded_below_float32"):
        print(
            f"note: gamma is rounded to {metadata['dtype']}, and a merge rounds again to the model's dtype, so the "
            "merged model can be one step off the exact result; the default (no --dtype) stores float32 and is exact"
        )
    vector.close()


def _command_merge(args: argparse.Namespace) -> None:
    from capvector.params.merging import merge, parse_alpha_arguments
    from capvector.params.streaming import retain_freed_memory

    retain_freed_memory()
    alpha, patterns = parse_alpha_arguments(args.alpha or ["1.0"])
    with _file_errors():
        output = merge(args.pretrained, args.vector, args.output, alpha=alpha, alpha_patterns=patterns)
    print(f"wrote {output}: theta_pt + {alpha} * gamma" + (f" with per-tensor alpha {patterns}" if patterns else ""))


def _command_inspect(args: argparse.Namespace) -> None:
    from capvector.params.inspection import inspect, plot_format

    with _file_errors():
        if args.plot:
            plot_format(args.plot)  # a bad file name is refused before the vector is read
        report = inspect(args.vector, against=args.against, base=args.base)
        if args.plot:
            report.plot(args.plot)
    if args.json:
        print(json.dumps(report.to_dict(), indent=2))
    else:
        print(report.table(per_tensor=args.per_tensor))
    if args.plot:
        print(f"plot: {args.plot}")


def _command_train(args: argparse.Namespace) -> None:
    import os

    from capvector.training.config import load_config
    from capvector.training.engine import train

    out_dir = train(load_config(args.config, args.overrides + (["resume=true"] if args.resume else [])))
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"wrote {out_dir / 'policy'}")


def _command_tasks(args: argparse.Namespace) -> None:
    from capvector.bench.env.tasks import list_tasks, resolve_tasks

    chosen = set(resolve_tasks(args.split)) if args.split else None
    rows = [row for row in list_tasks() if chosen is None or row["name"] in chosen]
    width = max(len(row["name"]) for row in rows)
    for row in rows:
        print(f"{row['name']:<{width}}  {row['split'] or '-':<10}  {row['instruction']}")


def _command_demos(args: argparse.Namespace) -> None:
    from capvector.bench.env.demos import generate_demonstrations

    started = time.time()

    def recorded(task: str, episodes: int, frames: int) -> None:
        _progress(f"{task}: {episodes} episodes recorded ({frames} frames, {time.time() - started:.0f} s)")

    path = generate_demonstrations(
        args.output,
        args.tasks,
        episodes_per_task=args.episodes,
        seed=args.seed,
        image_size=args.image_size,
        workers=args.workers,
        variant=args.variant,
        placement=args.placement,
        on_task=recorded,
        frame_stride=args.frame_stride,
    )
    print(f"wrote {path}")


def _command_evaluate(args: argparse.Namespace) -> None:
    import functools

    from capvector.bench.env.evaluation import ExpertPolicy, TaskResult, evaluate
    from capvector.bench.recipe import load_trained
    from capvector.files import write_json

    if (args.policy is None) == (not args.expert):
        raise CapvectorError("give a policy folder to evaluate, or --expert for the scripted experts (not both)")
    factory = ExpertPolicy if args.expert else functools.partial(load_trained, args.policy)
    started = time.time()

    def finished(task: TaskResult) -> None:
        _progress(f"{task.task}: {task.successes}/{task.episodes} successes ({time.time() - started:.0f} s)")

    result = evaluate(
        factory,
        args.tasks,
        episodes=args.episodes,
        seed=args.seed,
        workers=args.workers,
        variant=args.variant,
        gif_dir=args.gifs,
        image_size=args.image_size,
        placement=args.placement,
        on_task=finished,
    )
    for task in result.tasks:
        print(
            f"{task.task:<24} {task.success_rate:6.1%}  [{task.ci_low:.2f}, {task.ci_high:.2f}]  "
            f"({task.successes}/{task.episodes}, {task.mean_steps:.0f} steps)"
        )
    print(f"{'mean':<24} {result.success_rate:6.1%}  ({result.variant}, {result.wall_s:.0f} s)")
    if args.json:
        write_json(args.json, result.to_dict())


def _command_reproduce(args: argparse.Namespace) -> None:
    import dataclasses

    from capvector.bench.experiment.layout import RunLayout
    from capvector.bench.experiment.protocol import REGIME_FIELDS, preset_config
    from capvector.bench.experiment.reproduce import reproduce

    regime = {name: getattr(args, name) for name in REGIME_FIELDS if getattr(args, name) is not None}
    config = dataclasses.replace(preset_config(args.preset), **regime)
    folder = reproduce(config, out_dir=args.out, force=args.force, device=args.device)
    print(f"report: {RunLayout(folder).report_file}")


def _command_headroom(args: argparse.Namespace) -> None:
    import dataclasses

    from capvector.bench.experiment.headroom import AUX_ARMS, REGIMES, arm_weights, headroom

    if args.regime not in REGIMES:
        raise CapvectorError(f"unknown headroom regime {args.regime!r}; valid: {', '.join(REGIMES)}")
    config = REGIMES[args.regime]
    weights: dict[str, Any] = {}
    for arm in AUX_ARMS:
        given = getattr(args, f"{arm}_weights")
        try:
            weights[f"{arm}_weights"] = [float(w) for w in given.split(",")] if given else arm_weights(config, arm)
        except ValueError:
            flag = f"--{arm.replace('_', '-')}-weights"
            raise CapvectorError(f"{flag} {given!r}: give numbers separated by commas") from None
    arms = args.arms.split(",") if args.arms else config.arms
    config = dataclasses.replace(config, arms=arms, **weights)
    folder = headroom(config, out_dir=args.out)
    print((folder / "report.md").read_text())


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="capvector", description="Capability vectors for VLA policies.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str, help: str, run, add_help: bool = True) -> argparse.ArgumentParser:
        sub = commands.add_parser(
            name,
            help=help,
            description=help,
            epilog=EXAMPLES.get(name),
            formatter_class=argparse.RawDescriptionHelpFormatter,
            add_help=add_help,
        )
        sub.set_defaults(run=run)
        return sub

    p = command("extract", "Extract gamma = theta_ao - theta_ft from two finetunes.", _command_extract)
    p.add_argument("--aux", required=True, help="auxiliary-objective finetune (folder, file or LoRA adapter folder)")
    p.add_argument("--sft", required=True, help="plain SFT finetune with identical settings")
    p.add_argument("--pretrained", help="base model: resolves LoRA adapters; needed for --task-vector")
    p.add_argument("-o", "--output", required=True, help="new folder for the vector")
    p.add_argument("--include", action="append", default=[], metavar="GLOB", help="keep only matching parameter names")
    p.add_argument("--exclude", action="append", default=[], metavar="GLOB", help="leave out matching parameter names")
    p.add_argument(
        "--rank", type=int, help="store 2-D tensors as truncated-SVD factors of this rank (a positive integer)"
    )
    p.add_argument(
        "--dtype",
        help="stored dtype (default: float32 for bf16/fp16 inputs, which is exact; bf16/fp16 halve the size but round "
        "gamma, and a merge rounds again)",
    )
    p.add_argument("--task-vector", metavar="DIR", help="also save tau = theta_ft - theta_pt here (needs --pretrained)")
    p.add_argument("--no-hash", action="store_true", help="skip the SHA-256 of the sources (faster on huge models)")

    p = command(
        "merge", "Write theta_meta = theta_pt + alpha * gamma in the pretrained model's layout.", _command_merge
    )
    p.add_argument("--pretrained", required=True, help="pretrained checkpoint (folder or file)")
    p.add_argument("--vector", required=True, help="capability vector folder (dense or low-rank)")
    p.add_argument("-o", "--output", required=True, help="new folder (or file, for a single-file checkpoint)")
    p.add_argument(
        "--alpha",
        action="append",
        metavar="VALUE|GLOB=VALUE",
        help="global scale (default 1.0), or a per-tensor scale by pattern; repeatable, later ones win",
    )

    p = command(
        "inspect", "Norms of a vector per layer, relative to a base, and cosine with another.", _command_inspect
    )
    p.add_argument("vector")
    p.add_argument("--against", help="another vector for cosine similarity (e.g. the task vector)")
    p.add_argument("--base", help="pretrained checkpoint, for |gamma| / |theta_pt|")
    p.add_argument("--plot", metavar="FILE.png", help="write per-layer bar plots")
    p.add_argument("--per-tensor", action="store_true", help="one row per tensor instead of per layer")
    p.add_argument("--json", action="store_true", help="print the report as JSON")

    p = command(
        "train",
        "Finetune a policy: strategy sft, aux or capvector; full or LoRA; DDP under torchrun.",
        _command_train,
        add_help=False,
    )
    p.add_argument("-h", "--help", action=_FieldsHelp)
    p.add_argument("--config", help="a YAML or TOML file of TrainConfig fields (defaults when omitted)")
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a field (values are YAML; dotted keys reach into *_args: policy_args.dim=64)",
    )
    p.add_argument("--resume", action="store_true", help="continue from out_dir's latest checkpoint")

    p = command("tasks", "List the embedded benchmark's Meta-World tasks, splits and instructions.", _command_tasks)
    p.add_argument("--split", help="a split (pretrain, extract, downstream) or comma-separated task names")

    p = command("demos", "Record scripted-expert demonstrations into a LeRobot v3.0 dataset.", _command_demos)
    p.add_argument("-o", "--output", required=True, help="new dataset folder")
    p.add_argument("--tasks", default="pretrain", help="split or comma-separated task names (default: pretrain)")
    p.add_argument("--episodes", type=int, default=50, help="successful episodes per task (default: 50)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--workers", type=int, default=2, help="parallel processes")
    p.add_argument(
        "--variant",
        default="default",
        help="default, new_env (camera, lighting, table colour) or random_view (a new scene view each episode)",
    )
    p.add_argument("--placement", default="default", help="placement ranges: default (Meta-World's) or wide (2.5x)")
    p.add_argument(
        "--frame-stride",
        type=int,
        default=1,
        help="record every n-th control step only (a divisor of 80; for observation-only readers such as the "
        "teacher's pretraining, whose frame_stride must then be a multiple of it; default: 1, every step)",
    )

    p = command("evaluate", "Closed-loop success rate of a policy on held-out placements.", _command_evaluate)
    p.add_argument("policy", nargs="?", help="a policy folder (or a LoRA adapter folder on its base)")
    p.add_argument("--expert", action="store_true", help="evaluate the scripted experts instead")
    p.add_argument("--tasks", default="downstream", help="split or comma-separated task names (default: downstream)")
    p.add_argument("--episodes", type=int, default=20, help="episodes per task (default: 20)")
    p.add_argument("--seed", type=int, default=0, help="placement seed offset (disjoint from training seeds)")
    p.add_argument("--workers", type=int, default=2, help="parallel processes")
    p.add_argument(
        "--variant",
        default="default",
        help="default, new_env (the out-of-domain variant) or random_view (a new scene view each episode)",
    )
    p.add_argument("--placement", default="default", help="placement ranges: default (Meta-World's) or wide (2.5x)")
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--gifs", metavar="DIR", help="save one rollout per task as a GIF here")
    p.add_argument("--json", metavar="FILE", help="write every number as JSON")

    p = command(
        "reproduce", "The paper's experiment end to end on the embedded benchmark, with a report.", _command_reproduce
    )
    p.add_argument(
        "--preset",
        default="quick",
        help="quick (minutes, proves the pipeline), full (the experiment: wide placements, a moving camera, shifted "
        "images, 20 demonstrations per held-out task, the frozen 3D teacher's alignment and the localization control "
        "beside it, 5 seeds, methods (a)-(e), the control's (b') and (d') and the oracle at 1000 steps, alpha chosen "
        "on validation placements; 112 min on 2 cores), control (full's regime with the localization control as the "
        "objective, 1000 and 2000 steps; 88 min), spatial-forcing (control's regime with the frozen 3D teacher's "
        "alignment as the objective; 2 h), views (the localization control at 400 steps, 3 seeds), views-long (wide "
        "placements and a moving camera without shifted images, the localization control as the objective, 10 "
        "demonstrations per task) or gpu (full at paper-like sizes for one GPU)",
    )
    p.add_argument(
        "--objective",
        help="auxiliary objective of extraction and method (b): spatial (alignment with geometry from depth), teacher "
        "(alignment with a frozen 3D teacher pretrained first in the run folder), privileged (every visual token "
        "regresses object and goal positions) or localization (each patch regresses where they appear)",
    )
    p.add_argument("--placement", help="placement ranges of demonstrations and evaluation: default or wide (2.5x)")
    p.add_argument(
        "--variant",
        help="in-domain scene look of demonstrations and evaluation: default or random_view (new_env: "
        "the out-of-domain look, always evaluated too)",
    )
    p.add_argument(
        "--out",
        default="runs/reproduce",
        help="parent of the run folder <out>/<preset>, or <out>/<preset>-<regime> with --objective, --placement or "
        "--variant other than the preset's (e.g. runs/reproduce/quick-privileged-wide)",
    )
    p.add_argument("--force", action="append", default=[], metavar="STAGE", help="redo a stage (repeatable)")
    p.add_argument("--device", default="auto", help="auto (CUDA when present), cpu or cuda")

    p = command(
        "headroom", "Does knowing where objects are help? SFT against a privileged oracle, paired.", _command_headroom
    )
    p.add_argument(
        "--regime",
        default="wide",
        help="a regime of capvector.bench.experiment.headroom (an unknown name lists them); see the examples",
    )
    p.add_argument("--out", default="runs/headroom", help="parent of the run folder <out>/<regime>")
    p.add_argument(
        "--arms",
        default="",
        help="sft,oracle (always), noisy_oracle and biased_oracle (told the positions with the regime's oracle_noise, "
        "fresh at every read or a fixed function of the scene), control (the positive control on the visual tokens), "
        "control_queries (on the action queries) and teacher (alignment with "
        "a frozen 3D teacher, pretrained first in the run folder); the regime's by default",
    )
    for arm in ("control", "control_queries", "teacher"):  # headroom.AUX_ARMS, not imported: it loads torch
        p.add_argument(
            f"--{arm.replace('_', '-')}-weights",
            default="",
            help=f"the {arm} arm's candidate weights, e.g. 0.1,0.3 (the regime's by default); the one with the best "
            "success on validation placements is run with every seed",
        )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    try:
        status = run(build_parser().parse_args(argv))
        sys.stdout.flush()  # inside the try: a short output meets the closed pipe only here
        return status
    except BrokenPipeError:
        # the reader stopped reading (`capvector train --help | head`): nothing went wrong here
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


def run(args: argparse.Namespace) -> int:
    try:
        args.run(args)
    except CapvectorError as error:
        print(f"capvector {args.command}: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"capvector {args.command}: interrupted; no output was left behind", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
