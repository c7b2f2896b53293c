"""What the session's mailbox holds of a split: its size, and each rank's fixed part.

A module of its own, importing neither torch nor Ray Data: the mailbox hands these to the
workers without reading them (:func:`conure_dist.data.pipeline.split_in_memory` cuts the
parts in the driver), so a run whose splits are all cut into parts never makes the mailbox's
process import the data pipeline (seconds of a small machine's CPU while the workers start).
Only a streaming split does (the mailbox splits it).
"""

from __future__ import annotations

from dataclasses import dataclass

import pyarrow as pa
import ray


@dataclass(frozen=True)
class SplitSize:
    """What the data config needs to pad one dataset: its row count and Parquet schema."""

    rows: int
    schema: pa.Schema


@dataclass(frozen=True)
class Part:
    """One rank's fixed part of a split held in the object store: a table of consecutive rows
    of the padded split, by reference."""

    ref: ray.ObjectRef  # a pa.Table
    rows: int

    def table(self) -> pa.Table:
        """The part's rows as one table, read from the object store (without a copy
        when its columns are one chunk each): ``take()`` over a chunked list column would join
        the chunks each time."""
        return ray.get(self.ref).combine_chunks()
