"""The ``conure-dist`` command: one argparse parser, one subcommand per area."""

from __future__ import annotations

import argparse

from conure_dist.data.cli import add_prepare_parser


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="conure-dist", description=__doc__)
    subparsers = parser.add_subparsers(dest="command", required=True)
    add_prepare_parser(subparsers)
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    raise SystemExit(main())
