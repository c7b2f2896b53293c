"""Prepared datasets: the on-disk format, converters (TTL, MovieLens, synthetic), the Ray Data pipeline.

See ``docs/dataset-format.md`` for the format and :mod:`conure_dist.data.pipeline` for how
rows reach the training workers.
"""
