"""Serving a trained run: export it as one model directory, load it, predict and embed.

``conure-dist export`` writes the directory (:mod:`conure_dist.serve.artifact`), :func:`load`
reads it (:mod:`conure_dist.serve.model`), ``conure-dist predict`` serves a few users from a file
and ``conure-dist score`` scores or embeds a Parquet dataset with Ray Data
(:mod:`conure_dist.serve.score`).
"""

from conure_dist.serve.artifact import ModelFileError, export_model
from conure_dist.serve.model import BadSequence, ServedModel, UnknownTask, load

__all__ = ["BadSequence", "ModelFileError", "ServedModel", "UnknownTask", "export_model", "load"]
