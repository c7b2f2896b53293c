"""Conure on TTL-shaped data: the paper's TTL setting (SIGIR 2021, section 5.1) as defaults.

    python jobs/ttl.py --demo --run-dir runs/demo              # small synthetic run on a laptop
    python jobs/ttl.py --data PREPARED --run-dir DIR --workers 8 --gpus-per-worker 1
    ray job submit --working-dir . -- python jobs/ttl.py --data ... --run-dir s3://bucket/run

Rerunning a command with the same --run-dir resumes the run where it stopped.
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from conure_dist.config import ConfigError, ModelConfig, TrainConfig  # noqa: E402
from conure_dist.launch import Setting, add_run_arguments, dataset_in_run_dir, main_guard, run_job  # noqa: E402

TTL = Setting(
    name="ttl",
    model=ModelConfig(num_items=1, embed_dim=256, dilations=(1, 2, 4, 8) * 4),
    # T1 as in the authors' code: no L2; sampled softmax over 20 % of the items, drawn
    # log-uniformly by popularity rank.
    first=TrainConfig(lr=1e-3, batch_size=32, l2=0.0, sample_ratio=0.2, sampler="log_uniform",
                      epochs=10, retrain_epochs=5),
    # Later tasks: L2 on the task's own output layer only.
    later=TrainConfig(lr=1e-4, batch_size=512, l2=0.02, l2_scope="head", bpr_rho=0.3, epochs=10, retrain_epochs=5),
    ratios=(0.7, 0.8, 0.9, 0.8, 0.9, 0.9),  # leaves about 32 % of the backbone free
    l2_overrides={3: 0.05},  # head L2 of T3 (likes): the paper's T3 overfits at 0.02
    seq_len=100,
)

# --demo: a synthetic TTL-shaped dataset and a model small enough for a laptop CPU.
DEMO = Setting(
    name="ttl-demo",
    model=ModelConfig(num_items=1, embed_dim=32, dilations=(1, 2, 4, 8)),
    first=TrainConfig(lr=2e-3, batch_size=64, l2=0.0, sample_ratio=0.2, sampler="log_uniform", epochs=3,
                      retrain_epochs=1, patience=2),
    later=TrainConfig(lr=2e-3, batch_size=128, l2=1e-4, l2_scope="head", bpr_rho=0.3, epochs=3, retrain_epochs=1,
                      patience=2),
    ratios=TTL.ratios,
    seq_len=25,
)


def get_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--demo", action="store_true", help="prepare a small synthetic TTL-shaped dataset and run all six tasks")
    parser.add_argument("--raw-ttl", help="directory of the TTL files as released with the paper (prepared into RUN_DIR/data)")
    add_run_arguments(parser)
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = get_args(argv)
    setting = DEMO if args.demo else TTL
    dataset = args.data
    if args.demo:
        from conure_dist.data.synthetic import prepare_synthetic

        dataset = dataset_in_run_dir(args, lambda out: prepare_synthetic("demo", out, seed=args.seed))
    elif args.raw_ttl:
        from conure_dist.data.ttl import prepare_ttl

        dataset = dataset_in_run_dir(args, lambda out: prepare_ttl(args.raw_ttl, out))
    if not dataset:
        raise ConfigError("give --data (a prepared dataset), --raw-ttl, or --demo")
    return run_job(args, setting, dataset)


if __name__ == "__main__":
    sys.exit(main_guard(main))
