"""Worker sizing: hand-computed plans on tiny shapes, validation, and monotonicity."""

from __future__ import annotations

import doctest
import re
from dataclasses import replace

import pytest

from conure_dist import resources
from conure_dist.resources import GiB, MiB, SizingInputs, plan_run, plan_worker

# 9 items (+ padding row = 10), f = 4, 2 conv layers of kernel 3, largest head 5,
# batch 2 x seq 3, sample ratio 0.5 -> round(4.5) = 4 shared negatives.
TINY = SizingInputs(
    num_items=9, embed_dim=4, num_conv_layers=2, kernel_size=3, max_label_space=5,
    batch_size=2, seq_len=3, sample_ratio=0.5, zero_stage=0, num_workers=1,
    precision="fp32", use_gpu=False,
)

TTL = SizingInputs(
    num_items=646_000, embed_dim=256, num_conv_layers=16, kernel_size=3,
    max_label_space=18_000, batch_size=32, seq_len=100, sample_ratio=0.2,
    zero_stage=0, num_workers=1, precision="bf16", use_gpu=True,
)


def test_tiny_t1_fp32_cpu_zero0_by_hand():
    plan = plan_worker(TINY)
    # parameters: embedding 10*4 = 40, output 10*4 + 10 = 50, conv weights 2*4*4*3 = 96,
    # conv biases + LayerNorms 2*(4 + 2*4) = 24, head 5*4 + 5 = 25; T1 trains all but the head.
    assert plan.params == {"total": 235, "trainable": 210}
    expected = {
        "embedding": 40 * 4,
        "output_layer": 50 * 4,
        "backbone": (96 + 24) * 4,
        "heads": 25 * 4,
        # conv + embedding: frozen values (4 B) + bool mask; conv only: owner + W*mask (4 B)
        "owner_map_and_masks": (96 + 40) * (4 + 1) + 96 * (1 + 4),
        # T1 guard: the conv weights' frozen values (4 B) and masks (1 B), the frozen head
        "frozen_guard_copies": 96 * (4 + 1) + 25 * 4,
        "gradients": 210 * 4,
        "master_weights_fp32": 0,  # fp32 ZeRO-0 steps on the module's own weights
        "master_gradients_fp32": 0,
        "optimizer_state": 210 * 8,
        "reduce_bucket": 0,  # one worker: nothing to all-reduce
        # 2*3 positions * f=4 * (4.5 per conv layer * 2 + 3) * 4 B + LN stats 6 * 2 * 8 B
        "activations": 6 * 4 * 12 * 4 + 6 * 2 * 8,
        # rows 2*(3-1) = 4 x 4 negatives x 4 fp32 copies;
        # gathered output rows (4 negatives + 4 targets) * f * 4 B, value and gradient
        "sampled_softmax_logits": 4 * 4 * 16 + (4 + 4) * 4 * 4 * 2,
        # test eval: 4 * 2 rows x 10 candidates x (4 + 4 + 1) B = 720 < activations + logits
        "evaluation_headroom": 0,
        # one worker: no all-reduce bucket, so nothing of the step is freed before its peak
        "freed_before_the_peak": 0,
    }
    tensors = sum(expected.values())
    assert tensors == 6960
    expected["framework_overhead"] = GiB + 696  # process + 10 % allocator slack
    assert plan.components == expected
    assert plan.total_bytes == 6960 + 696 + GiB
    # CPU worker: everything above plus checkpoint staging (params + optimizer state),
    # rounded up to whole MiB.
    staging = 160 + 200 + 480 + 100 + 1680
    assert plan.host_bytes == 1025 * MiB >= plan.total_bytes + staging
    assert plan.resources == {"CPU": 1.0, "memory": float(1025 * MiB)}
    assert plan.fits is None and plan.recommendation is None


def test_tiny_item_task_bf16_gpu_zero2_by_hand():
    inputs = replace(
        TINY, task_kind="item", zero_stage=2, num_workers=2, precision="bf16", use_gpu=True,
        reduce_bucket_elements=8,
    )
    plan = plan_worker(inputs)
    # trainable: conv weights 96 + head 25 = 121; shard ceil(121/2) = 61; the largest
    # trainable tensor is one conv weight, 4*4*3 = 48.
    assert plan.params["trainable"] == 121
    expected = {
        "embedding": 40 * 2,
        "output_layer": 50 * 2,
        "backbone": 120 * 2,
        "heads": 25 * 2,
        "owner_map_and_masks": (96 + 40) * (2 + 1) + 96 * (1 + 2),
        # later-task guard copies: conv frozen values (2 B) + masks (1 B), the embedding, the
        # T1 output layer (weight + bias), conv biases and LayerNorms; no other head exists
        "frozen_guard_copies": 96 * (2 + 1) + 40 * 2 + (40 + 10) * 2 + 24 * 2,
        "gradients": 61 * 2,  # this worker's partition (during backward, each is copied into the bucket)
        "master_weights_fp32": 61 * 4,
        "master_gradients_fp32": 61 * 4,
        "optimizer_state": 61 * 8,
        "reduce_bucket": 8 * 2,  # a GPU allocates the whole bucket
        # global batch 2 on 2 workers: 1 row x seq 3 = 3 positions per worker
        "activations": 3 * 4 * 12 * 2 + 3 * 2 * 8,
        # [1 row, |Y| = 5] x (4 fp32 copies + bool + the bf16 matmul output)
        "head_logits": 1 * 5 * (16 + 2),
        "evaluation_headroom": 0,  # 4 * 2 rows x 5 labels x 7 B = 280 < 336 + 90
        # the largest gradient in full (a conv weight, 48 x 2 B) fits in what backward frees
        "largest_gradient_in_full": 0,
        # backward: activations 336 + logits 90 + bucket 16 = 442; after it: the gradient
        # partition 122 + its fp32 copy 244 = 366, the smaller phase
        "freed_before_the_peak": -366,
    }
    assert sum(expected.values()) == 2856
    expected["framework_overhead"] = GiB + 285
    assert plan.components == expected
    # GPU worker RAM: 2 GiB process + staging (params 470 + master 244 + Adam 488) -> 2049 MiB
    assert plan.resources == {"CPU": 4.0, "GPU": 1.0, "memory": float(2049 * MiB)}


def test_guard_checksums_the_large_frozen_tables_at_ttl_scale():
    plan = plan_worker(replace(TTL, task_kind="item", total_label_space=26_016))
    # embedding and T1 output weight: 646,001 x 256 = 165,376,256 elements > 16 Mi each ->
    # on a GPU 20 chunks of 8 Mi x 16 B, plus one 8 Mi int64 buffer and its weights (128 MiB);
    # copies: 16 conv layers x 196,608 x (2 + 1) B, the T1 output bias 646,001 x 2 B,
    # 16 x 3 x 256 biases/LayerNorms x 2 B, the other head (26,016 - 18,000) x 257 x 2 B
    expected = (
        2 * 20 * 16 + 128 * MiB
        + 16 * 196_608 * 3 + 646_001 * 2 + 16 * 768 * 2 + 8_016 * 257 * 2
    )
    assert plan.components["frozen_guard_copies"] == expected
    full_copies = 2 * 165_376_256 * 2  # what cloning both tables in bf16 would hold
    assert expected < full_copies / 4

    pruned = plan_worker(replace(TTL, task_kind="item", prune_embedding=True))
    # the embedding is watched through its frozen values and its bool mask, both checksummed
    assert pruned.components["frozen_guard_copies"] == (
        3 * 20 * 16 + 128 * MiB + 16 * 196_608 * 3 + 646_001 * 2 + 16 * 768 * 2
    )


def test_guard_constants_match_the_guard():
    from conure_dist.model import freeze

    assert resources.GUARD_LARGE_TENSOR_ELEMENTS == freeze.LARGE_TENSOR_ELEMENTS
    assert resources.GUARD_CHUNK_ELEMENTS == freeze.CHECKSUM_CHUNK_ELEMENTS
    assert resources.GUARD_CHUNK_ELEMENTS_GPU == freeze.CHECKSUM_CHUNK_ELEMENTS_CUDA


def test_zero1_shards_optimizer_but_not_gradients():
    z0 = plan_worker(replace(TINY, num_workers=2))
    z1 = plan_worker(replace(TINY, num_workers=2, zero_stage=1))
    assert z1.components["gradients"] == z0.components["gradients"] == 210 * 4
    assert z1.components["optimizer_state"] == 105 * 8
    assert z1.components["master_weights_fp32"] == 105 * 4


def test_bf16_zero0_keeps_full_fp32_master():
    plan = plan_worker(replace(TINY, precision="bf16"))
    assert plan.components["master_weights_fp32"] == 210 * 4
    assert plan.components["gradients"] == 210 * 2


def test_prune_embedding_adds_owner_map_and_trainable_embedding():
    plain = plan_worker(replace(TINY, task_kind="item"))
    pruned = plan_worker(replace(TINY, task_kind="item", prune_embedding=True))
    # the embedding's owner entries (1 B) and its effective weight (4 B); its frozen-value
    # buffer and mask exist either way
    assert pruned.components["owner_map_and_masks"] - plain.components["owner_map_and_masks"] == 40 * (1 + 4)
    assert pruned.params["trainable"] - plain.params["trainable"] == 40


def test_evaluation_headroom_when_full_ranking_outgrows_training():
    plan = plan_worker(replace(TINY, num_items=999, sample_ratio=0.01))
    # train: activations 1248 + logits 4 rows x 10 negatives x 16 B + (10 + 4) * 4 * 4 * 2
    # eval: 4 * 2 rows x 1000 candidates x (4 + 4 + 1) B
    assert plan.components["sampled_softmax_logits"] == 640 + 448
    assert plan.components["evaluation_headroom"] == 72_000 - (1248 + 640 + 448)


def test_workers_split_the_global_batch():
    split = plan_worker(replace(TTL, batch_size=32, num_workers=4))
    single = plan_worker(replace(TTL, batch_size=8, num_workers=1))
    assert split.inputs.micro_batch == 8
    assert split.components["activations"] == single.components["activations"]
    assert split.components["sampled_softmax_logits"] == single.components["sampled_softmax_logits"]


def test_every_task_head_is_counted():
    one = plan_worker(TTL)
    all_heads = plan_worker(replace(TTL, total_label_space=26_016))
    assert one.components["heads"] == 18_000 * 257 * 2
    assert all_heads.components["heads"] == 26_016 * 257 * 2
    with pytest.raises(ValueError, match="total_label_space"):
        replace(TTL, total_label_space=100)


def test_num_sampled_never_zero():
    assert replace(TINY, sample_ratio=0.01).num_sampled == 1
    assert TTL.num_sampled == 129_200


@pytest.mark.parametrize(
    "field, value",
    [
        ("num_items", 0), ("embed_dim", 0), ("num_conv_layers", 0), ("kernel_size", 0),
        ("max_label_space", -1), ("batch_size", 0), ("seq_len", 1), ("sample_ratio", 0.0),
        ("sample_ratio", 1.5), ("zero_stage", 3), ("num_workers", 0), ("precision", "fp16"),
        ("use_gpu", 1), ("num_items", 2.5), ("num_items", True), ("task_kind", "ranking"),
        ("reduce_bucket_elements", 0),
    ],
)
def test_invalid_inputs_name_the_field(field, value):
    with pytest.raises(ValueError, match=rf"SizingInputs\.{field}\b"):
        replace(TINY, **{field: value})


def test_later_task_needs_a_head():
    with pytest.raises(ValueError, match="max_label_space"):
        replace(TINY, task_kind="class", max_label_space=0)


@pytest.mark.parametrize(
    "kwargs, name",
    [
        ({"gpus_per_worker": 2}, "gpus_per_worker"),
        ({"cpus_per_worker": 0}, "cpus_per_worker"),
        ({"gpu_memory_bytes": -1}, "gpu_memory_bytes"),
    ],
)
def test_invalid_plan_arguments(kwargs, name):
    with pytest.raises(ValueError, match=name):
        plan_worker(replace(TINY, use_gpu=True), **kwargs)


@pytest.mark.parametrize("base", [TINY, TTL], ids=["tiny-cpu", "ttl-gpu"])
def test_bigger_vocabulary_needs_more_memory(base):
    small = plan_worker(base)
    big = plan_worker(replace(base, num_items=base.num_items * 2))
    assert big.total_bytes > small.total_bytes
    assert big.resources["memory"] >= small.resources["memory"]
    assert big.components["embedding"] > small.components["embedding"]


@pytest.mark.parametrize("base", [TINY, TTL], ids=["tiny-cpu", "ttl-gpu"])
@pytest.mark.parametrize("workers", [2, 4, 8])
def test_zero2_needs_less_per_worker_than_zero0(base, workers):
    z0 = plan_worker(replace(base, zero_stage=0, num_workers=workers))
    z1 = plan_worker(replace(base, zero_stage=1, num_workers=workers))
    z2 = plan_worker(replace(base, zero_stage=2, num_workers=workers))
    assert z2.total_bytes < z0.total_bytes and z2.total_bytes < z1.total_bytes
    # fp32 ZeRO-1 on 2 workers costs more than ZeRO-0: it halves Adam (8 B -> 4 B per
    # parameter) but adds an fp32 master copy of the partition (4 B), and its reduction bucket
    # is alive during backward, next to the activations and logits, where ZeRO-0 flattens its
    # gradients only after them. From 4 workers on, the sharding wins.
    if workers >= 4 or base.precision == "bf16":
        assert z1.total_bytes <= z0.total_bytes


def test_zero2_per_worker_memory_falls_with_workers():
    totals = [plan_worker(replace(TTL, zero_stage=2, num_workers=n)).total_bytes for n in (1, 2, 4, 8)]
    assert totals == sorted(totals, reverse=True) and totals[0] > totals[-1]


def test_bigger_batch_needs_more_activation_memory():
    small = plan_worker(replace(TTL, task_kind="item", batch_size=32))
    big = plan_worker(replace(TTL, task_kind="item", batch_size=512))
    assert big.components["activations"] == pytest.approx(16 * small.components["activations"])


def test_fits_and_recommendation():
    roomy = plan_worker(TTL, gpu_memory_bytes=80 * GiB)
    assert roomy.fits is True and roomy.recommendation is None

    tight = 10 * GiB  # under the 11.35 GiB of ZeRO-0 on one worker
    plan = plan_worker(TTL, gpu_memory_bytes=tight)
    assert plan.fits is False
    match = re.search(r"--zero-stage (\d) --workers (\d+)", plan.recommendation or "")
    assert match, plan.recommendation
    stage, workers = int(match[1]), int(match[2])
    assert plan_worker(replace(TTL, zero_stage=stage, num_workers=workers), gpu_memory_bytes=tight).fits
    if workers > 1:  # the smallest power-of-two worker count that fits at that stage
        half = replace(TTL, zero_stage=stage, num_workers=workers // 2)
        assert not plan_worker(half, gpu_memory_bytes=tight).fits

    hopeless = plan_worker(TTL, gpu_memory_bytes=2 * GiB)
    assert hopeless.fits is False
    assert "lower the batch size" in hopeless.recommendation


def test_fractional_gpu_gets_a_fraction_of_its_memory():
    plan = plan_worker(TTL, gpu_memory_bytes=24 * GiB, gpus_per_worker=0.5)
    assert plan.device_bytes_available == 12 * GiB
    assert plan.resources["GPU"] == 0.5


def test_plan_run_takes_the_largest_stage():
    t1 = plan_run(TTL, later_batch_size=512)
    assert t1.inputs.task_kind == "sequence"  # 129K-wide sampled softmax dominates
    later = plan_run(replace(TTL, sample_ratio=0.001), later_batch_size=4096)
    assert later.inputs.task_kind == "item" and later.inputs.batch_size == 4096
    only_t1 = plan_run(replace(TTL, max_label_space=0), later_batch_size=4096)
    assert only_t1.inputs.task_kind == "sequence"


def test_table_lists_every_component_and_the_request():
    plan = plan_worker(TTL, gpu_memory_bytes=2 * GiB)
    text = plan.table()
    for name in plan.components:
        assert name in text
    assert "total" in text and '"memory"' in text and '"GPU": 1' in text
    assert "DOES NOT FIT" in text and "recommendation:" in text


def test_module_docstring_example_holds():
    failures, _ = doctest.testmod(resources)
    assert failures == 0


@pytest.mark.parametrize("sampler", ["log_uniform", "uniform"])
def test_distinct_draws_match_what_the_sampler_draws(sampler):
    import numpy as np
    import torch

    from conure_dist.train.samplers import log_uniform_sampler, uniform_sampler

    inputs = replace(TTL, num_items=50_000, sample_ratio=0.2, sampler=sampler)
    draws = uniform_sampler(50_001, (0,)) if sampler == "uniform" else \
        log_uniform_sampler(np.random.default_rng(0).integers(0, 100, 50_001), (0,))
    seen = [torch.unique(draws.sample(inputs.num_sampled, torch.Generator().manual_seed(s))).numel() for s in range(3)]
    assert inputs.distinct_sampled < inputs.num_sampled
    assert abs(inputs.distinct_sampled - sum(seen) / 3) < 0.01 * inputs.distinct_sampled, (inputs.distinct_sampled, seen)
    assert replace(inputs, sample_ratio=1.0).distinct_sampled == 50_000  # the exact softmax: every item


def test_zero2_counts_the_largest_gradient_where_it_outgrows_activations_and_logits():
    """Many workers shrink the per-worker batch (activations, logits) but not the embedding's
    gradient, which exists in full before it is copied into the reduction bucket."""
    for workers in (4, 64):
        plan = plan_worker(replace(TTL, zero_stage=2, num_workers=workers))
        c = plan.components
        transient = c["activations"] + c["sampled_softmax_logits"]
        embedding_grad = (646_000 + 1) * 256 * 2
        assert c["largest_gradient_in_full"] == max(0, embedding_grad - transient)
    assert plan.components["largest_gradient_in_full"] > 0  # 64 workers: 1 row each
    assert "largest_gradient_in_full" not in plan_worker(TTL).components  # ZeRO-0 reduces after backward
