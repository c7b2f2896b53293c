"""Conure on MovieLens, with the paper's ML setting (SIGIR 2021, section 5.1) scaled to the
data as the config (preset ``movielens``).

    python -m conure_dist.jobs.movielens --raw path/to/ml-100k --run-dir runs/ml100k
    python -m conure_dist.jobs.movielens --data PREPARED --run-dir DIR --workers 4 --gpus-per-worker 1

The raw directory (MovieLens 100K or 1M layout, local or a URI) is prepared into RUN_DIR/data
on first use. Rerunning a command with the same --run-dir resumes the run where it stopped.
"""

from __future__ import annotations

import argparse
import sys

from conure_dist.launch import add_run_arguments, main_guard, run_from_args


def get_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m conure_dist.jobs.movielens", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--raw", help="MovieLens directory or URI (u.data + u.user, or ratings.dat + users.dat)")
    add_run_arguments(parser, "movielens")
    return parser


def get_args(argv=None) -> argparse.Namespace:
    return get_parser().parse_args(argv)


def main(argv=None) -> int:
    args = get_args(argv)
    args.argv, args.job = list(argv) if argv is not None else sys.argv[1:], "movielens"
    return run_from_args(args, "movielens")


if __name__ == "__main__":
    sys.exit(main_guard(main))
