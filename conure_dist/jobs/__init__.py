"""The jobs: ``python -m conure_dist.jobs.ttl``, ``python -m conure_dist.jobs.movielens`` (also
``jobs/ttl.py`` and ``jobs/movielens.py`` in the repository, and ``conure-dist train``)."""
