"""The ``conure-dist`` command.

    conure-dist prepare movielens|ttl|synthetic ...   raw data -> a prepared dataset
    conure-dist train --preset ttl --data ... --run-dir ...   train (or resume) a run
    conure-dist config list | show NAME               the shipped configs (YAML)
    conure-dist export --run-dir ... --out MODEL_DIR  a trained run as one model directory
    conure-dist predict --model MODEL_DIR --task NAME --input FILE   a few users, JSON lines out
    conure-dist score --model MODEL_DIR --task NAME --input DATA --output DATA   Ray Data batch scoring
    conure-dist evaluate --model MODEL_DIR            a model's test metrics next to the run's
"""

from __future__ import annotations

import argparse
import sys

from conure_dist import __version__
from conure_dist.data.cli import add_prepare_parser
from conure_dist.serve.cli import add_serve_parsers


def _add_train_parser(subparsers) -> None:
    from conure_dist.launch import add_run_arguments, run_from_args

    train = subparsers.add_parser(
        "train", help="train or resume a run (the jobs' options; preset ttl unless --preset)",
        description="Train (or resume) a run from a config: --preset, then --config files, then these options.")
    train.add_argument("--raw", help="raw data (directory or URI) for the preset's source (ttl, movielens)")
    add_run_arguments(train, "ttl")
    train.set_defaults(func=lambda args: run_from_args(args, "ttl"))


def _add_config_parser(subparsers) -> None:
    config = subparsers.add_parser("config", help="list or print the shipped run configs")
    actions = config.add_subparsers(dest="action", required=True)
    actions.add_parser("list", help="names of the shipped configs").set_defaults(func=_config_list)
    show = actions.add_parser("show", help="print a shipped config (YAML with comments) to copy and edit")
    show.add_argument("name", help="ttl | movielens | demo")
    show.set_defaults(func=_config_show)


def _config_list(args) -> int:
    from conure_dist.runconfig import preset_names

    print("\n".join(preset_names()))
    return 0


def _config_show(args) -> int:
    from conure_dist.runconfig import preset_text

    print(preset_text(args.name), end="")
    return 0


def main(argv: list[str] | None = None) -> int:
    from conure_dist.launch import main_guard

    parser = argparse.ArgumentParser(prog="conure-dist", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"conure-dist {__version__}")
    subparsers = parser.add_subparsers(dest="command", required=True)
    add_prepare_parser(subparsers)
    _add_train_parser(subparsers)
    _add_config_parser(subparsers)
    add_serve_parsers(subparsers)
    args = parser.parse_args(argv)
    return main_guard(lambda _: args.func(args))


if __name__ == "__main__":
    sys.exit(main())
