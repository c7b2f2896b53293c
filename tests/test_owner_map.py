import pytest
import torch

from conure_dist.model import OwnerMap, Stage, prune_free_weights
from conure_dist.model.owner_map import trainable_mask, used_mask


def test_capacity_after_two_prunes_matches_the_ratios():
    """Ratios 0.7 then 0.8: T1 owns 30 %, T2 14 %, 56 % stays free (each tensor)."""
    g = torch.Generator().manual_seed(0)
    shapes = {"a": (64, 64, 3), "b": (100, 50)}
    owners = OwnerMap.for_shapes(shapes)
    weights = {n: torch.randn(s, generator=g) for n, s in shapes.items()}
    owners = owners.prune(weights, task=1, ratio=0.7)
    weights = {n: torch.randn(s, generator=g) for n, s in shapes.items()}
    owners = owners.prune(weights, task=2, ratio=0.8)
    for name in [*shapes, None]:
        cap = owners.capacity(name)
        assert cap.fraction(1) == pytest.approx(0.30, abs=1e-3)
        assert cap.fraction(2) == pytest.approx(0.14, abs=1e-3)
        assert cap.free_fraction == pytest.approx(0.56, abs=1e-3)
    table = owners.capacity_table({1: "t1", 2: "clicks"})
    assert "t1" in table and "56.0%" in table


def test_prune_keeps_largest_free_magnitudes_and_breaks_ties_by_index():
    w = torch.tensor([0.5, -3.0, 1.0, 1.0, 1.0, 0.1, 2.0, -0.2])
    owner = torch.tensor([0, 1, 0, 0, 0, 0, 0, 0], dtype=torch.uint8)  # index 1 already owned by T1
    new = prune_free_weights(w, owner, task=2, ratio=0.5)  # 7 free -> keep round(3.5) = 4
    # free magnitudes: 2.0 (idx 6), then 1.0 at idx 2, 3, 4 (tie, all kept), then 0.5
    assert new.tolist() == [0, 1, 2, 2, 2, 0, 2, 0]
    w2 = torch.tensor([1.0, 1.0, 1.0, 1.0])
    tie = prune_free_weights(w2, torch.zeros(4, dtype=torch.uint8), task=1, ratio=0.5)
    assert tie.tolist() == [1, 1, 0, 0]  # lower flat index wins among equal magnitudes
    assert torch.equal(tie, prune_free_weights(w2, torch.zeros(4, dtype=torch.uint8), task=1, ratio=0.5))


def test_views_follow_the_mask_algebra():
    owner = torch.tensor([0, 1, 2, 3], dtype=torch.uint8)
    assert used_mask(owner, 3, Stage.TRAIN).tolist() == [True, True, True, False]
    assert trainable_mask(owner, 3, Stage.TRAIN).tolist() == [True, False, False, False]
    assert used_mask(owner, 2, Stage.RETRAIN).tolist() == [False, True, True, False]
    assert trainable_mask(owner, 2, Stage.RETRAIN).tolist() == [False, False, True, False]
    assert used_mask(owner, 2, Stage.SERVE).tolist() == [False, True, True, False]
    assert not trainable_mask(owner, 3, Stage.SERVE).any()


@pytest.mark.parametrize("ratio", [0.0, 1.0, -0.1, 1.5])
def test_prune_refuses_ratio_outside_open_interval(ratio):
    with pytest.raises(ValueError, match="strictly between 0 and 1"):
        prune_free_weights(torch.randn(10), torch.zeros(10, dtype=torch.uint8), 1, ratio)


def test_prune_refuses_more_than_255_tasks_and_empty_prunes():
    with pytest.raises(ValueError, match="at most 255"):
        prune_free_weights(torch.randn(10), torch.zeros(10, dtype=torch.uint8), 256, 0.5)
    with pytest.raises(ValueError, match="no weight at all"):
        prune_free_weights(torch.randn(3), torch.zeros(3, dtype=torch.uint8), 1, 0.9)  # keeps round(0.3) = 0
    owner = torch.tensor([1, 0, 0, 0], dtype=torch.uint8)
    with pytest.raises(ValueError, match="prune each task once"):
        prune_free_weights(torch.randn(4), owner, 1, 0.5)


def test_state_dict_round_trip_and_immutability():
    owners = OwnerMap.for_shapes({"w": (4, 5)})
    pruned = owners.prune({"w": torch.randn(4, 5)}, 1, 0.5)
    assert owners.capacity().free == 20  # prune returned a new map
    restored = OwnerMap.from_state_dict(pruned.state_dict())
    assert restored == pruned and restored.max_task == 1
    with pytest.raises(TypeError, match="uint8"):
        OwnerMap({"w": torch.zeros(3)})


def _prune_by_sort(weight, owner, task, ratio):
    """The definition: a stable sort of -|w| over the free entries, the first n_keep kept."""
    flat = owner.reshape(-1)
    free = torch.nonzero(flat == 0).reshape(-1)
    n_keep = int(round((1.0 - ratio) * free.numel()))
    order = torch.sort(-weight.reshape(-1)[free].abs().double(), stable=True).indices
    out = flat.clone()
    out[free[order[:n_keep]]] = task
    return out.reshape(owner.shape)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_prune_by_selection_matches_the_stable_sort_definition(dtype):
    gen = torch.Generator().manual_seed(3)
    for trial in range(20):
        shape = (int(torch.randint(2, 40, (1,), generator=gen)), 7)
        # Few distinct magnitudes, both signs: ties everywhere, also across the threshold.
        weight = (torch.randint(-4, 5, shape, generator=gen).float() / 2).to(dtype)
        owner = torch.zeros(shape, dtype=torch.uint8)
        owner[torch.rand(shape, generator=gen) < 0.3] = 1
        ratio = float(torch.rand(1, generator=gen) * 0.8 + 0.1)
        if round((1 - ratio) * int((owner == 0).sum())) == 0:
            continue
        assert torch.equal(prune_free_weights(weight, owner, 2, ratio), _prune_by_sort(weight, owner, 2, ratio)), trial


def test_prune_refuses_non_finite_weights():
    w = torch.tensor([1.0, float("nan"), 0.5, 2.0])
    with pytest.raises(ValueError, match="non-finite weights"):
        prune_free_weights(w, torch.zeros(4, dtype=torch.uint8), task=1, ratio=0.5)
