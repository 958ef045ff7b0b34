"""`jaxmoelora train CONFIG [section.field=value ...]`."""

from __future__ import annotations

import argparse


def add_train_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "train", help="fine-tune a model with an adapter method",
        description="Train (or resume) from a YAML config (configs/<method>.yaml) with section.field=value overrides, "
                    "e.g. `jaxmoelora train configs/loramoe.yaml train.steps=200 adapter.num_experts=6`.")
    p.add_argument("config", nargs="?", default=None, help="YAML config file (optional: all defaults otherwise)")
    p.add_argument("overrides", nargs="*", help="section.field=value overrides")
    p.set_defaults(run=run_train)


def run_train(args: argparse.Namespace) -> int:
    from jaxmoelora.training.config import load_experiment
    from jaxmoelora.training.trainer import train

    config_path, overrides = args.config, list(args.overrides)
    if config_path is not None and "=" in config_path:
        config_path, overrides = None, [config_path, *overrides]
    config = load_experiment(config_path, overrides)
    result = train(config)
    return 0 if result.stop_reason in ("completed", "data_exhausted", "interrupted") else 1
