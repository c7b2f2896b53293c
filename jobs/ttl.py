"""Conure on TTL-shaped data (the job lives in the package: ``python -m conure_dist.jobs.ttl``).

    python jobs/ttl.py --demo --run-dir runs/demo
    ray job submit --working-dir . -- python jobs/ttl.py --data s3://bucket/ttl --run-dir s3://bucket/run
"""

import sys

from conure_dist.jobs.ttl import get_args, main  # noqa: F401  (get_args: the job's own parser)
from conure_dist.launch import main_guard

if __name__ == "__main__":
    sys.exit(main_guard(main))
