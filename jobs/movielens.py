"""Conure on MovieLens (the job lives in the package: ``python -m conure_dist.jobs.movielens``).

    python jobs/movielens.py --raw path/to/ml-100k --run-dir runs/ml100k
"""

import sys

from conure_dist.jobs.movielens import get_args, main  # noqa: F401  (get_args: the job's own parser)
from conure_dist.launch import main_guard

if __name__ == "__main__":
    sys.exit(main_guard(main))
