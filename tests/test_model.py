import pytest
import torch

from conure_dist.config import ModelConfig, TaskSpec
from conure_dist.model import ConureModel, FrozenGuard, FrozenWeightsChanged, Stage, merge_stage_weights

TASKS = [TaskSpec("t1", "sequence"), TaskSpec("clicks", "item", num_labels=7), TaskSpec("age", "class", num_labels=3)]


def small(backbone="nextitnet", **kw):
    torch.manual_seed(0)
    return ConureModel(ModelConfig(num_items=30, embed_dim=8, dilations=(1, 2, 4, 8), backbone=backbone, max_seq_len=12, **kw), TASKS)


@pytest.mark.parametrize("backbone", ["nextitnet", "transformer"])
def test_hidden_state_is_causal(backbone):
    model = small(backbone).eval()
    g = torch.Generator().manual_seed(1)
    seq = torch.randint(1, 31, (4, 12), generator=g)
    seq[:, :2] = 0  # left padding
    changed = seq.clone()
    changed[:, 7:] = torch.randint(1, 31, (4, 5), generator=g)
    a, b = model.hidden(seq), model.hidden(changed)
    assert torch.equal(a[:, :7], b[:, :7])
    assert not torch.allclose(a[:, 7:], b[:, 7:])  # the test could see a difference


def test_causal_conv_is_the_left_padded_conv1d_with_contiguous_output():
    from torch.nn import functional as F

    from conure_dist.model.masked import CausalConv1d

    torch.manual_seed(0)
    conv = CausalConv1d(16, 3, dilation=2)
    x = torch.randn(3, 11, 16, requires_grad=True)
    y = conv(x)
    ref = F.conv1d(F.pad(x.transpose(1, 2), (4, 0)), conv.weight, conv.bias, dilation=2).transpose(1, 2)
    assert y.shape == (3, 11, 16) and y.is_contiguous()
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-6)
    grads = torch.autograd.grad(y.square().sum(), (x, conv.weight))
    ref_grads = torch.autograd.grad(ref.square().sum(), (x, conv.weight))
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backbone", ["nextitnet", "transformer"])
def test_frozen_entries_get_no_gradient_and_used_mask_applies(backbone):
    model = small(backbone)
    owners = model.new_owner_map().prune({n: torch.randn(s) for n, s in model.prunable_shapes().items()}, 1, 0.6)
    model.set_view(owners, "clicks", Stage.TRAIN)
    seq = torch.randint(1, 31, (3, 12))
    model.heads["clicks"](model.user_representation(seq)).sum().backward()
    for name, module in model.masked_modules():
        frozen = owners.owner(name) == 1
        assert module.weight.grad is not None
        assert torch.all(module.weight.grad[frozen] == 0)
        assert module.weight.grad[~frozen].abs().sum() > 0
    shared = dict(model.named_parameters())
    assert not shared["backbone.blocks.0.ln1.weight"].requires_grad  # LayerNorm frozen after T1
    assert not shared["heads.t1.weight"].requires_grad and shared["heads.clicks.weight"].requires_grad
    # Retrain view of T1 must not use free (unowned) entries: changing them leaves outputs alone.
    model.set_view(owners, "t1", Stage.SERVE)
    out = model.hidden(seq)
    with torch.no_grad():
        for name, module in model.masked_modules():
            module.weight.add_(torch.where(owners.owner(name) == 0, 5.0, 0.0))
    model.set_view(owners, "t1", Stage.SERVE)
    assert torch.equal(out, model.hidden(seq))


def test_guard_refuses_moved_frozen_entries():
    model = small()
    owners = model.new_owner_map().prune({n: torch.randn(s) for n, s in model.prunable_shapes().items()}, 1, 0.5)
    model.set_view(owners, "clicks", Stage.TRAIN)
    guard = FrozenGuard(model)
    assert guard.check() == 0
    name, module = next(iter(model.masked_modules()))
    with torch.no_grad():
        module.weight_frozen[0, 0, :2] += 1.0
        model.backbone.embedding.weight[3, :4] -= 1.0  # frozen whole tensor after T1
    with pytest.raises(FrozenWeightsChanged) as err:
        guard.check()
    assert "weight_frozen: 2 of" in str(err.value) and "embedding.weight: 4 of" in str(err.value)


def test_merge_takes_only_trainable_entries_and_refuses_changed_frozen_ones():
    model = small()
    committed = model.weights()
    owners = model.new_owner_map().prune(committed, 1, 0.5)
    name = owners.names[0]
    trained = {k: v + 1.0 for k, v in committed.items()}
    # A well-behaved stage: frozen entries reported unchanged.
    trained[name] = torch.where(owners.owner(name) == 1, committed[name], trained[name])
    for k in trained:
        if not k.startswith("heads.clicks") and k not in owners.names:
            trained[k] = committed[k].clone()
    for other in owners.names[1:]:
        trained[other] = torch.where(owners.owner(other) == 1, committed[other], trained[other])
    merged = merge_stage_weights(committed, trained, owners, "clicks", 2, Stage.TRAIN)
    free = owners.owner(name) == 0
    assert torch.equal(merged[name][free], trained[name][free])
    assert torch.equal(merged[name][~free], committed[name][~free])
    assert torch.equal(merged["heads.clicks.weight"], trained["heads.clicks.weight"])
    trained[name] = trained[name] + 0.5  # now also frozen entries moved
    with pytest.raises(FrozenWeightsChanged, match="frozen entries changed"):
        merge_stage_weights(committed, trained, owners, "clicks", 2, Stage.TRAIN)


def test_pruned_embedding_is_in_the_owner_map():
    model = small(prune_embedding=True)
    assert "backbone.embedding.weight" in model.prunable_shapes()
    assert "backbone.embedding.weight" not in small().prunable_shapes()


def test_task_order_rules():
    cfg = ModelConfig(num_items=5, embed_dim=4, dilations=(1, 2))
    with pytest.raises(ValueError, match="first task must be the sequence task"):
        ConureModel(cfg, [TaskSpec("age", "class", num_labels=2)])
    with pytest.raises(ValueError, match="duplicate"):
        ConureModel(cfg, [TaskSpec("t1", "sequence"), TaskSpec("t1", "class", num_labels=2)])
