"""Conure on TTL-shaped data, with the paper's TTL setting (SIGIR 2021, section 5.1) as the
config (preset ``ttl``; ``--demo``: preset ``demo``).

    python -m conure_dist.jobs.ttl --demo --run-dir runs/demo     # small synthetic run on a laptop
    python -m conure_dist.jobs.ttl --data PREPARED --run-dir DIR --workers 8 --gpus-per-worker 1
    ray job submit --working-dir . -- python jobs/ttl.py --data s3://bucket/ttl --run-dir s3://bucket/run
    python -m conure_dist.jobs.ttl --config my.yaml --set tasks.like.l2=0.05 --print-config

Rerunning a command with the same --run-dir resumes the run where it stopped.
"""

from __future__ import annotations

import argparse
import sys

from conure_dist.launch import add_run_arguments, main_guard, run_from_args


def get_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m conure_dist.jobs.ttl", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--demo", action="store_true",
                        help="preset demo: prepare a small synthetic TTL-shaped dataset and run all six tasks")
    parser.add_argument("--raw-ttl", "--raw", dest="raw",
                        help="directory or URI of the TTL files released with the paper (prepared into RUN_DIR/data)")
    parser.add_argument("--allow-new-users", action="store_true", default=None,
                        help="with --raw-ttl: accept later-task sequences that match no first-task user (counted) "
                             "instead of stopping (config: source.allow_new_users)")
    add_run_arguments(parser, "ttl")
    return parser


def get_args(argv=None) -> argparse.Namespace:
    return get_parser().parse_args(argv)


def main(argv=None) -> int:
    args = get_args(argv)
    args.argv, args.job = list(argv) if argv is not None else sys.argv[1:], "ttl"
    if args.demo and (args.data or args.raw):
        from conure_dist.config import ConfigError

        raise ConfigError("--demo prepares its own synthetic dataset; it cannot be combined with "
                          + ("--data" if args.data else "--raw-ttl"))
    return run_from_args(args, "demo" if args.demo else "ttl")


if __name__ == "__main__":
    sys.exit(main_guard(main))
