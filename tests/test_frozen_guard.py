"""The in-stage frozen guard: any change to a frozen tensor fails loudly, naming it."""

from __future__ import annotations

import pytest
import torch

from conure_dist.config import ModelConfig, TaskSpec
from conure_dist.model import ConureModel, FrozenGuard, FrozenWeightsChanged, Stage
from conure_dist.model import freeze

TASKS = [TaskSpec("t1", "sequence"), TaskSpec("clicks", "item", num_labels=7)]
CONTEXT = "task clicks, train stage"


def clicks_stage():
    """A later-task stage (embedding, T1 output layer, LayerNorms frozen; conv weights masked)
    and an optimizer over what it may train."""
    torch.manual_seed(0)
    model = ConureModel(ModelConfig(num_items=30, embed_dim=8, dilations=(1, 2), max_seq_len=6), TASKS)
    owners = model.new_owner_map().prune({n: torch.randn(s) for n, s in model.prunable_shapes().items()}, 1, 0.5)
    model.set_view(owners, "clicks", Stage.TRAIN)
    optimizer = torch.optim.Adam(model.trainable_parameters(), lr=0.1)
    return model, optimizer


def take_step(model, optimizer):
    seq = torch.randint(1, 31, (4, 6))
    optimizer.zero_grad()
    model.heads["clicks"](model.user_representation(seq)).pow(2).mean().backward()
    optimizer.step()


def test_unchanged_model_passes_after_real_steps():
    model, optimizer = clicks_stage()
    guard = FrozenGuard(model, context=CONTEXT)
    before = model.heads["clicks"].weight.detach().clone()
    for _ in range(2):
        take_step(model, optimizer)
        assert guard.check() == 0
    assert not torch.equal(before, model.heads["clicks"].weight)  # the step did train something


def test_changed_frozen_entries_raise_naming_tensors_counts_and_context():
    model, optimizer = clicks_stage()
    guard = FrozenGuard(model, context=CONTEXT)
    take_step(model, optimizer)
    name, module = next(iter(model.masked_modules()))
    prefix = name.removesuffix(".weight")  # the owner map names the parameter, the guard the buffer
    with torch.no_grad():
        module.weight_frozen.view(-1)[:2] += 1.0
        model.backbone.embedding.weight[3, :4] -= 1.0  # frozen whole tensor after T1
    with pytest.raises(FrozenWeightsChanged) as err:
        guard.check()
    message = str(err.value)
    assert CONTEXT in message
    assert f"{prefix}.weight_frozen: 2 of {module.weight_frozen.numel():,} entries changed" in message
    assert f"backbone.embedding.weight: 4 of {31 * 8} entries changed" in message
    with pytest.raises(FrozenWeightsChanged):  # nothing was quietly restored
        guard.check()


def test_bit_level_changes_count_and_nan_is_not_a_change():
    model, optimizer = clicks_stage()
    ln = model.backbone.blocks[0].ln1.weight
    with torch.no_grad():
        ln[0] = float("nan")
        ln[1] = 0.0
    guard = FrozenGuard(model, context=CONTEXT)
    take_step(model, optimizer)
    assert guard.check() == 0  # a frozen NaN stays equal to itself
    with torch.no_grad():
        ln[1] = -0.0  # == 0.0, but not the same weights
    with pytest.raises(FrozenWeightsChanged, match=r"blocks\.0\.ln1\.weight: 1 of 8 entries changed"):
        guard.check()


@pytest.fixture
def small_checksum_threshold(monkeypatch):
    # embedding and T1 output weight (31 x 8 = 248 elements) go through the checksum path
    monkeypatch.setattr(freeze, "LARGE_TENSOR_ELEMENTS", 200)
    monkeypatch.setattr(freeze, "CHECKSUM_CHUNK_ELEMENTS", 64)


def test_large_tensor_change_raises_naming_tensor_and_chunk(small_checksum_threshold):
    model, optimizer = clicks_stage()
    guard = FrozenGuard(model, context=CONTEXT)
    assert guard.checksummed == ["backbone.embedding.weight", "heads.t1.weight"]
    take_step(model, optimizer)
    assert guard.check() == 0
    with torch.no_grad():
        model.heads["t1"].weight.view(-1)[130] += 2**-20  # one entry, by a tiny amount
    with pytest.raises(FrozenWeightsChanged) as err:
        guard.check()
    message = str(err.value)
    assert CONTEXT in message
    assert "heads.t1.weight: checksum of chunk(s) 2 (entries 128..191) changed" in message
    assert "number of changed entries unknown" in message
    assert "backbone.embedding.weight" not in message


def test_large_tensor_swap_within_a_chunk_is_caught(small_checksum_threshold):
    model, _ = clicks_stage()
    guard = FrozenGuard(model, context=CONTEXT)
    flat = model.backbone.embedding.weight.detach().view(-1)
    with torch.no_grad():  # same values, same plain sum: only the position-weighted sum sees it
        a, b = flat[200].clone(), flat[245].clone()
        assert a != b
        flat[200], flat[245] = b, a
    with pytest.raises(FrozenWeightsChanged) as err:
        guard.check()
    assert "backbone.embedding.weight: checksum of chunk(s) 3 (entries 192..247)" in str(err.value)


@pytest.mark.parametrize(
    "dtype, bits_dtype, flips",
    [(torch.bfloat16, torch.int16, (1, 1 << 6, -(1 << 15))), (torch.bool, torch.uint8, (1,))],
    ids=["bf16", "bool"],
)
def test_checksum_catches_every_single_bit_flip(small_checksum_threshold, dtype, bits_dtype, flips):
    holder = torch.nn.Module()
    holder.t = torch.nn.Parameter((torch.randn(300) > 0) if dtype == torch.bool else torch.randn(300).to(dtype),
                                  requires_grad=False)
    guard = FrozenGuard(holder)
    assert guard.checksummed == ["t"]
    bits = holder.t.data.view(bits_dtype)
    for i in (0, 151, 299):
        for flip in flips:  # lowest bit, a middle bit, the sign bit
            bits[i] ^= flip
            with pytest.raises(FrozenWeightsChanged, match=r"t: checksum"):
                guard.check()
            bits[i] ^= flip
            assert guard.check() == 0


def test_checksum_keeps_a_fraction_of_the_memory(small_checksum_threshold):
    model, _ = clicks_stage()
    exact = FrozenGuard(model, large_tensor_elements=10**9)
    summed = FrozenGuard(model)
    big = 2 * 31 * 8 * 4  # embedding and T1 output weight, fp32
    # 2 tensors x 4 chunks x 16 B of tables, plus one int64 buffer and its weights of 64 each
    assert exact.snapshot_bytes - summed.snapshot_bytes == big - (2 * 4 * 16 + 2 * 64 * 8)
