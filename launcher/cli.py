"""The ``recgpt`` command line: ``recgpt <subcommand> …`` or ``python -m launcher <subcommand> …``.

Command handlers live only in ``launcher/`` (this module, ``shards_cmd``, ``model_cmd``, ``tune_cmd``): they parse
arguments, call library functions with typed arguments and print. The packages are imported lazily so
``--help`` is fast and ``shards`` never imports torch's distributed stack. Any
:class:`~configs.errors.RecgptError` becomes one line on stderr and exit code 2 — never a traceback.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

from configs import ConfigError, RecgptError, load_config
from launcher import model_cmd, shards_cmd, tune_cmd
from launcher.common import add_config_args

EXIT_USAGE = 2


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="recgpt",
        description="Fine-tune GPT-style language models for recommendation: "
        "WebDataset shards -> DeepSpeed ZeRO training (LoRA, adversarial) -> HF safetensors export.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="<command>")

    shards_cmd.add_parsers(sub)
    # ------------------------------------------------------------------ train
    t = sub.add_parser(
        "train",
        help="train under DeepSpeed (one process, torchrun, or Ray Train with ray.num_workers > 0)",
        description="Train a recommender on any Hugging Face causal LM or a preset decoder-only transformer "
        "(GPT-2 or SASRec/BART block layout). Runs as one process, unchanged under "
        "`torchrun --no-python --nproc_per_node N recgpt train …`, or through Ray Train when "
        "ray.num_workers > 0 or a [min, max] range (connects to RAY_ADDRESS when set, else starts a "
        "local Ray).",
    )
    add_config_args(t)

    tune_cmd.add_parsers(sub)
    model_cmd.add_parsers(sub)
    return parser


def _dispatch(args: argparse.Namespace) -> int:
    if args.command == "shards":
        return shards_cmd.run(args)
    if args.command == "train":
        cfg = load_config(args.config, args.overrides)
        if cfg.ray.max_workers > 0:
            if "LOCAL_RANK" in os.environ or "TORCHELASTIC_RUN_ID" in os.environ:
                raise ConfigError(
                    "ray.num_workers: > 0 cannot run under torchrun: launch one process, Ray starts the workers"
                )
            from launcher.ray_launch import train_with_ray

            return train_with_ray(cfg) or 0
        from trainer.loop import train

        train(cfg)
        return 0
    if args.command == "tune":
        return tune_cmd.run(args)
    if args.command in model_cmd.COMMANDS:
        return model_cmd.run(args)
    raise AssertionError(args.command)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Parse ``argv``; ``key=value`` overrides may also come after options (``build IN --out D k=v``).

    argparse fills a ``nargs="*"`` positional at the first positional run (possibly with nothing), so
    overrides after an option would be "unrecognized": collect them here instead.
    """
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    stray = [a for a in extra if a.startswith("-") or "=" not in a or not hasattr(args, "overrides")]
    if stray:
        parser.error(f"unrecognized arguments: {' '.join(stray)}")
    if extra:
        args.overrides = [*args.overrides, *extra]
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        return _dispatch(args)
    except BrokenPipeError:
        # The reader of our output went away (`recgpt shards inspect --json | head`): stop quietly.
        # Python would print a second BrokenPipeError when it flushes stdout at exit; point it at devnull.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except RecgptError as e:
        print(f"recgpt {args.command}: error: {e}", file=sys.stderr)
        return EXIT_USAGE


if __name__ == "__main__":
    sys.exit(main())
