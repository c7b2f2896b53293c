"""Conure on MovieLens: the paper's ML setting (SIGIR 2021, section 5.1), scaled to the data.

    python jobs/movielens.py --raw ../shared/data/ml-100k --run-dir runs/ml100k
    python jobs/movielens.py --data PREPARED --run-dir DIR --workers 4 --gpus-per-worker 1

The raw directory (MovieLens 100K or 1M layout) is prepared into RUN_DIR/data on first use.
Rerunning a command with the same --run-dir resumes the run where it stopped.
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from conure_dist.config import ConfigError, ModelConfig, TrainConfig  # noqa: E402
from conure_dist.launch import Setting, add_run_arguments, dataset_in_run_dir, main_guard, run_job  # noqa: E402

# Paper ML: f = 256, dilations 6 x {1,2,4,8}, ratios 0.7/0.8/0.7 for T1..T3. The profile tasks
# (gender, age, occupation) continue with the TTL ratios for profile tasks.
ML = Setting(
    name="movielens",
    model=ModelConfig(num_items=1, embed_dim=256, dilations=(1, 2, 4, 8) * 6),
    # T1 as in the authors' code: no L2, log-uniform negatives; later tasks: L2 on their head.
    first=TrainConfig(lr=1e-3, batch_size=32, l2=0.0, sample_ratio=0.2, sampler="log_uniform",
                      epochs=10, retrain_epochs=5),
    later=TrainConfig(lr=1e-4, batch_size=512, l2=0.02, l2_scope="head", bpr_rho=0.3, epochs=10, retrain_epochs=5),
    ratios=(0.7, 0.8, 0.7, 0.8, 0.9, 0.9),
    seq_len=30,  # T1 keeps each user's most recent 30 clicks
)


def get_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--raw", help="MovieLens directory (u.data + u.user, or ratings.dat + users.dat)")
    add_run_arguments(parser)
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = get_args(argv)
    dataset = args.data
    if args.raw:
        from conure_dist.data.movielens import prepare_movielens

        dataset = dataset_in_run_dir(args, lambda out: prepare_movielens(args.raw, out))
    if not dataset:
        raise ConfigError("give --data (a prepared dataset) or --raw (a MovieLens directory)")
    return run_job(args, ML, dataset)


if __name__ == "__main__":
    sys.exit(main_guard(main))
