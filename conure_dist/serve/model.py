"""Serving an exported model: predictions and user representations for every committed task.

Example::

    from conure_dist import serve

    model = serve.load("models/demo")
    model.tasks                                   # ('pretrain', 'click', ...)
    model.predict("pretrain", [["12", "7", "33"]], k=5)
    # [{'items': ['41', ...], 'scores': [7.1, ...]}]
    model.predict("age", [["12", "7", "33"]], k=2)
    # [{'labels': ['age_3', 'age_1'], 'probabilities': [0.41, 0.22]}]
    vectors = model.embed([["12", "7", "33"]], task="click")   # numpy [1, embed_dim]

Sequences are lists of item tokens (the dataset's original tokens), oldest first. A token the
model does not know maps to the out-of-vocabulary item where the dataset has one, else it is
left out; either way the result lists it under ``unknown``. Sequences longer than the model's
window keep their most recent items (``truncated`` says how many were dropped). A sequence with
no known item is refused (:class:`BadSequence`), naming its index.

Serving task k uses only the backbone weights owned by tasks 1..k (the owner map's SERVE view)
and task k's head: the computation that evaluated task k when it was committed.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from safetensors.torch import load as st_load

from conure_dist.config import ModelConfig, TaskSpec, from_dict
from conure_dist.data.format import PAD_ID
from conure_dist.model import ConureModel, OwnerMap, Stage
from conure_dist.serve.artifact import ModelFileError, read_model_dir

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


class UnknownTask(ModelFileError):
    """A task the model does not serve (never trained, or not committed when it was exported)."""


class BadSequence(ValueError):
    """A sequence that cannot be served (empty, or no item the model knows)."""


@dataclass
class Encoded:
    """Sequences as padded item ids, with what happened to each one."""

    ids: torch.Tensor  # [n, window] int64, left-padded with 0
    tokens: list[list[str]]  # the tokens of each sequence, as given (str)
    unknown: list[list[str]] = field(default_factory=list)  # per sequence: tokens not in the vocabulary
    truncated: list[int] = field(default_factory=list)  # per sequence: oldest items dropped to fit the window
    problems: list[str | None] = field(default_factory=list)  # per sequence: why it cannot be served, or None


class ServedModel:
    """A loaded model directory (see :func:`load`)."""

    def __init__(self, doc: dict, files: Mapping[str, bytes], *, device: str = "cpu", dtype: str = "float32"):
        if dtype not in DTYPES:
            raise ValueError(f"dtype: one of {sorted(DTYPES)}, got {dtype!r}")
        self.doc, self.device, self.dtype = doc, torch.device(device), DTYPES[dtype]
        if self.dtype == torch.bfloat16:
            from conure_dist.train.engine import native_bf16

            if not native_bf16(self.device):
                import logging

                logging.getLogger("conure_dist").warning(
                    f"serving in bfloat16 on a {self.device.type} without bf16 arithmetic in hardware: torch emulates "
                    "it, many times slower than float32")
        self.specs = {t["name"]: TaskSpec(name=t["name"], kind=t["kind"], num_labels=t["num_labels"]) for t in doc["tasks"]}
        self.tasks: tuple[str, ...] = tuple(self.specs)
        self.seq_len: int = int(doc["seq_len"])
        self.oov_item_id: int | None = doc["oov_item_id"]
        config = from_dict(ModelConfig, doc["model"])
        self.network = ConureModel(config, list(self.specs.values()), patched=doc["patched"])
        self.owners = OwnerMap.from_state_dict(st_load(files["owners.safetensors"])) if doc["masking"] else None
        if doc["per_task_weights"]:
            self._sets = {t: st_load(files[f"sets/{t}.safetensors"]) for t in self.tasks}
        else:
            shared = st_load(files["weights.safetensors"])
            self._sets = {t: shared for t in self.tasks}
        items = pq.read_table(pa.BufferReader(files["vocab/items.parquet"]))
        self.item_tokens = _id_to_token(items, config.num_items + 1)
        self.item_ids = {tok: i for i, tok in enumerate(self.item_tokens) if tok is not None}
        self.label_tokens: dict[str, list[str]] = {}
        self.label_ids: dict[str, dict[str, int]] = {}
        for task in self.tasks:
            if self.specs[task].kind != "sequence":
                table = pq.read_table(pa.BufferReader(files[f"vocab/labels/{task}.parquet"]))
                self.label_tokens[task] = _id_to_token(table, self.specs[task].num_labels)
                self.label_ids[task] = {tok: i for i, tok in enumerate(self.label_tokens[task])}
        self.network.to(self.device)
        self._view: str | None = None

    # -- tasks ---------------------------------------------------------------------------------
    def task_info(self, task: str) -> dict[str, Any]:
        """The exported entry of ``task``: kind, labels, main metric, test metrics at its commit."""
        self._check(task)
        return next(t for t in self.doc["tasks"] if t["name"] == task)

    def _check(self, task: str) -> None:
        if task not in self.specs:
            left = self.doc["source"].get("left_out", {})
            why = f" ({left[task]} when the model was exported)" if task in left else ""
            raise UnknownTask(f"task {task!r} is not served by this model{why}; it serves {list(self.tasks)}")

    def use(self, task: str) -> ConureModel:
        """The network in the view that serves ``task`` (weights owned by T1..T``task``)."""
        self._check(task)
        if self._view != task:
            weights = self._sets[task]
            self.network.float()  # the view is computed on the fp32 weights, then cast
            if self._view is None or self._sets[self._view] is not weights or self.dtype != torch.float32:
                self.network.load_weights(weights)
            self.network.set_view(self.owners, task, Stage.SERVE)
            self.network.to(self.device, self.dtype).eval()
            self._view = task
        return self.network

    def window(self, task: str) -> int:
        """Items a sequence of ``task`` is read with: T1 predicts the item after the last
        ``seq_len - 1`` (as it was trained and evaluated), later tasks read ``seq_len``."""
        return self.seq_len - 1 if self.specs[task].kind == "sequence" else self.seq_len

    # -- inputs --------------------------------------------------------------------------------
    def encode(self, sequences: Sequence[Sequence[Any]], window: int, *, ids: bool = False) -> Encoded:
        """Token (or, with ``ids``, item id) sequences -> left-padded ids ``[n, window]``."""
        out = np.zeros((len(sequences), window), dtype=np.int64)
        enc = Encoded(torch.empty(0), [])
        for row, seq in enumerate(sequences):
            tokens = [str(t) for t in (seq if seq is not None else [])]
            if ids:
                known, unknown = [], []
                for tok in tokens:  # a token that is no id of the vocabulary is unknown, never a crash
                    item = int(tok) if tok.lstrip("-").isdigit() else 0
                    if 0 < item <= self.network.config.num_items:
                        known.append(item)
                    else:
                        unknown.append(tok)
            else:
                known, unknown = [], []
                for tok in tokens:
                    item = self.item_ids.get(tok)
                    if item is None:
                        unknown.append(tok)
                        if self.oov_item_id is not None:
                            known.append(self.oov_item_id)
                    else:
                        known.append(item)
            kept = known[-window:]
            if kept:
                out[row, window - len(kept):] = kept
            problem = None
            if not tokens:
                problem = "empty sequence"
            elif not kept or all(i == self.oov_item_id for i in kept):
                problem = "no known item"
            enc.tokens.append(tokens)
            enc.unknown.append(unknown)
            enc.truncated.append(len(known) - len(kept))
            enc.problems.append(problem)
        enc.ids = torch.from_numpy(out)
        return enc

    def _encode_or_raise(self, sequences, window: int) -> Encoded:
        if isinstance(sequences, (str, bytes)) or (sequences and isinstance(sequences[0], (str, bytes))):
            raise TypeError("sequences: a list of sequences (each a list of item tokens), e.g. [['12', '7']]")
        enc = self.encode(sequences, window)
        for row, problem in enumerate(enc.problems):
            if problem:
                raise BadSequence(f"sequence {row}: {problem}")
        return enc

    # -- outputs -------------------------------------------------------------------------------
    @torch.no_grad()
    def representation(self, task: str, ids: torch.Tensor) -> torch.Tensor:
        """The vector ``task``'s head reads, for padded id sequences ``[n, window]``: fp32 ``[n, d]``."""
        network = self.use(task)
        ids = ids.to(self.device)
        if self.specs[task].kind == "sequence":
            return network.hidden(ids)[:, -1].float()
        return network.user_representation(ids).float()

    @torch.no_grad()
    def scores(self, task: str, ids: torch.Tensor) -> torch.Tensor:
        """Scores over ``task``'s whole output space, fp32 ``[n, labels]``: items (T1: padding and
        OOV at -inf), labels (item tasks) or class logits."""
        network = self.use(task)
        h = self.representation(task, ids).to(self.dtype)
        scores = network.heads[task](h).float()
        if self.specs[task].kind == "sequence":
            scores[:, PAD_ID] = float("-inf")
            if self.oov_item_id is not None:
                scores[:, self.oov_item_id] = float("-inf")
        return scores

    def predict_encoded(self, task: str, enc: Encoded, k: int, exclude_seen: bool = False) -> list[dict[str, Any]]:
        """:meth:`predict` on encoded sequences; rows with a problem get ``{"error": ...}``."""
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        spec = self.specs[task]
        results: list[dict[str, Any]] = [{"error": p} if p else {} for p in enc.problems]
        good = [i for i, p in enumerate(enc.problems) if p is None]
        if good:
            scores = self.scores(task, enc.ids[good])
            if exclude_seen and spec.kind != "class":
                lookup = self.item_ids if spec.kind == "sequence" else self.label_ids[task]
                for r, i in enumerate(good):
                    seen = [lookup[t] for t in enc.tokens[i] if t in lookup]
                    scores[r, seen] = float("-inf")
            if spec.kind == "class":
                probs = torch.softmax(scores, dim=-1)
                top = torch.topk(probs, min(k, spec.num_labels), dim=-1)
                names = self.label_tokens[task]
                for r, i in enumerate(good):
                    results[i] = {"labels": [names[j] for j in top.indices[r].tolist()],
                                  "probabilities": [round(p, 6) for p in top.values[r].tolist()]}
            else:
                top = torch.topk(scores, min(k, scores.shape[1]), dim=-1)
                names = self.item_tokens if spec.kind == "sequence" else self.label_tokens[task]
                for r, i in enumerate(good):
                    keep = torch.isfinite(top.values[r])  # never return padding, OOV or excluded items
                    results[i] = {"items": [names[j] for j in top.indices[r][keep].tolist()],
                                  "scores": [round(s, 6) for s in top.values[r][keep].tolist()]}
        for i, res in enumerate(results):
            if enc.unknown[i]:
                res["unknown"] = enc.unknown[i]
            if enc.truncated[i]:
                res["truncated"] = enc.truncated[i]
        return results

    def predict(self, task: str, sequences: Sequence[Sequence[Any]], k: int = 5,
                exclude_seen: bool = False) -> list[dict[str, Any]]:
        """For each sequence: T1 and item tasks, the top ``k`` items (``items``, ``scores``);
        class tasks, the ``k`` likeliest labels (``labels``, ``probabilities``). Padding and the
        OOV item are never recommended; ``exclude_seen`` also leaves out items already in the
        sequence (T1; for an item task, the labels whose token is the token of an item in the
        sequence, which is meaningful where the labels are items of T1's vocabulary, as in
        MovieLens)."""
        self._check(task)
        return self.predict_encoded(task, self._encode_or_raise(sequences, self.window(task)), k, exclude_seen)

    def embed(self, sequences: Sequence[Sequence[Any]], task: str | None = None) -> np.ndarray:
        """User representations ``[n, embed_dim]`` (float32): the backbone's last hidden state in
        the view that serves ``task`` (default: the last task), the input of that task's head."""
        task = task or self.tasks[-1]
        self._check(task)
        enc = self._encode_or_raise(sequences, self.window(task))
        return self.representation(task, enc.ids).cpu().numpy()

    def evaluate(self, task: str, dataset: str, split: str = "test") -> dict[str, float]:
        """Full-ranking metrics of ``task`` on a split of a prepared dataset (the one the run was
        trained on), computed as the run's evaluation computes them."""
        from conure_dist.data.format import load_dataset_info
        from conure_dist.data.pipeline import load_split_batches
        from conure_dist.eval.evaluate import evaluate_task

        entry = self.task_info(task)
        info = load_dataset_info(dataset)
        batches = load_split_batches(info, task, split, entry["eval_batch_size"], self.seq_len)
        return evaluate_task(self.use(task), self.specs[task], batches, entry["metric_k"], self.device)


def _id_to_token(table: pa.Table, size: int) -> list[str | None]:
    tokens: list[str | None] = [None] * size
    for i, tok in zip(table.column("id").to_pylist(), table.column("token").to_pylist()):
        if 0 <= i < size:
            tokens[i] = tok
    return tokens


def load(model_dir: str, *, device: str = "cpu", dtype: str = "float32") -> ServedModel:
    """Open a model directory written by ``conure-dist export`` (local path or URI), checking every
    file against its checksum. ``dtype="bfloat16"`` serves in bf16 (the view is computed in fp32)."""
    doc, files = read_model_dir(model_dir)
    return ServedModel(doc, files, device=device, dtype=dtype)
