"""The `capvector` command: a thin layer over the Python API (each command is one call there)."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence

from .errors import CapvectorError

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
}


def _command_extract(args: argparse.Namespace) -> None:
    from .vectors import extract

    vector = extract(args.aux, args.sft, args.output, pretrained=args.pretrained, include=args.include,
                     exclude=args.exclude, dtype=args.dtype, rank=args.rank, task_vector_output=args.task_vector,
                     hash_sources=not args.no_hash)
    skipped = {k: len(v) for k, v in vector.metadata.get("skipped", {}).items() if v}
    print(f"wrote {args.output}: {len(vector)} tensors, |gamma| = {vector.metadata['global_norm']:.6g}"
          + (f"; skipped {skipped}" if skipped else ""))
    vector.close()


def _command_merge(args: argparse.Namespace) -> None:
    from .merging import merge, parse_alpha_arguments

    alpha, patterns = parse_alpha_arguments(args.alpha or ["1.0"])
    output = merge(args.pretrained, args.vector, args.output, alpha=alpha, alpha_patterns=patterns)
    print(f"wrote {output}: theta_pt + {alpha} * gamma" + (f" with per-tensor alpha {patterns}" if patterns else ""))


def _command_inspect(args: argparse.Namespace) -> None:
    from .inspection import inspect

    report = inspect(args.vector, against=args.against, base=args.base)
    if args.json:
        print(json.dumps(report.to_dict(), indent=2))
    else:
        print(report.table(per_tensor=args.per_tensor))
    if args.plot:
        print(f"plot: {report.plot(args.plot)}")


def _command_train(args: argparse.Namespace) -> None:
    from .training import command

    command(args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="capvector", description="Capability vectors for VLA policies.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str, help: str, run) -> argparse.ArgumentParser:
        sub = commands.add_parser(name, help=help, description=help, epilog=EXAMPLES.get(name),
                                  formatter_class=argparse.RawDescriptionHelpFormatter)
        sub.set_defaults(run=run)
        return sub

    p = command("extract", "Extract gamma = theta_ao - theta_ft from two finetunes.", _command_extract)
    p.add_argument("--aux", required=True, help="auxiliary-objective finetune (folder, file or LoRA adapter folder)")
    p.add_argument("--sft", required=True, help="plain SFT finetune with identical settings")
    p.add_argument("--pretrained", help="base model: resolves LoRA adapters; needed for --task-vector")
    p.add_argument("-o", "--output", required=True, help="new folder for the vector")
    p.add_argument("--include", action="append", default=[], metavar="GLOB", help="keep only matching parameter names")
    p.add_argument("--exclude", action="append", default=[], metavar="GLOB", help="leave out matching parameter names")
    p.add_argument("--rank", type=int, help="store 2-D tensors as truncated-SVD factors of this rank")
    p.add_argument("--dtype", help="stored dtype (default: the inputs')")
    p.add_argument("--task-vector", metavar="DIR", help="also save tau = theta_ft - theta_pt here (needs --pretrained)")
    p.add_argument("--no-hash", action="store_true", help="skip the SHA-256 of the sources (faster on huge models)")

    p = command("merge", "Write theta_meta = theta_pt + alpha * gamma in the pretrained model's layout.", _command_merge)
    p.add_argument("--pretrained", required=True, help="pretrained checkpoint (folder or file)")
    p.add_argument("--vector", required=True, help="capability vector folder (dense or low-rank)")
    p.add_argument("-o", "--output", required=True, help="new folder (or file, for a single-file checkpoint)")
    p.add_argument("--alpha", action="append", metavar="VALUE|GLOB=VALUE",
                   help="global scale (default 1.0), or a per-tensor scale by pattern; repeatable, later ones win")

    p = command("inspect", "Norms of a vector per layer, relative to a base, and cosine with another.", _command_inspect)
    p.add_argument("vector")
    p.add_argument("--against", help="another vector for cosine similarity (e.g. the task vector)")
    p.add_argument("--base", help="pretrained checkpoint, for |gamma| / |theta_pt|")
    p.add_argument("--plot", metavar="FILE.png", help="write per-layer bar plots")
    p.add_argument("--per-tensor", action="store_true", help="one row per tensor instead of per layer")
    p.add_argument("--json", action="store_true", help="print the report as JSON")

    p = command("train", "Finetune a policy: strategy sft, aux or capvector; full or LoRA; DDP under torchrun.",
                _command_train)
    p.add_argument("--config", help="a YAML or TOML file of TrainConfig fields (defaults when omitted)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a field (values are YAML; dotted keys reach into *_args: policy_args.dim=64)")
    p.add_argument("--resume", action="store_true", help="continue from out_dir's latest checkpoint")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
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
