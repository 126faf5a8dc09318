"""Argument helpers shared by the subcommand modules."""

from __future__ import annotations

import argparse


def add_config_args(p: argparse.ArgumentParser, example: str = "train.max_steps=100") -> None:
    p.add_argument(
        "--config",
        "-c",
        help="YAML file of overrides (see configs/); every default lives in configs/schema.py",
    )
    p.add_argument(
        "overrides",
        nargs="*",
        metavar="key=value",
        help=f"dotlist overrides applied last, e.g. {example}",
    )
