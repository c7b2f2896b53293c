"""User-sequence encoders: NextItNet (dilated causal CNN), a causal pre-LN Transformer, and
the bag-of-items feed-forward network (the paper's DNN reference, blind to order).

Each maps item ids ``[batch, length]`` (0 = padding, left-padded) to hidden states
``[batch, length, dim]``; position j depends only on items at positions <= j. The user
representation for tasks after T1 is the last position's vector.

NextItNet and the Transformer take optional *patches* (PeterRec's model patches): per block a
pair of small residual bottlenecks, inserted after each of the block's two sub-layers, with the
up-projection initialised to zero so that a new patch starts as the identity.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from conure_dist.config import ModelConfig
from conure_dist.model.masked import CausalConv1d, ItemEmbedding, PrunableLinear


class Bottleneck(nn.Module):
    """``h + up(ReLU(down(h)))``, a residual bottleneck of width ``rank``; identity at init."""

    def __init__(self, dim: int, rank: int):
        super().__init__()
        self.down = nn.Linear(dim, rank)
        self.up = nn.Linear(rank, dim)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return h + self.up(F.relu(self.down(h)))


def patch_rank(dim: int) -> int:
    """Bottleneck width of a patch: an eighth of the hidden width (at least 4)."""
    return max(4, dim // 8)


class BlockPatch(nn.Module):
    """One block's patches: after its first and after its second sub-layer."""

    def __init__(self, dim: int):
        super().__init__()
        self.first = Bottleneck(dim, patch_rank(dim))
        self.second = Bottleneck(dim, patch_rank(dim))


def _same(h: torch.Tensor) -> torch.Tensor:
    return h


class ResidualBlock(nn.Module):
    """``E_l = E_{l-1} + ReLU(conv2(LN2(ReLU(conv1(LN1(E_{l-1}))))))`` (paper eq. 2-3)."""

    def __init__(self, dim: int, kernel_size: int, dilations: tuple[int, int]):
        super().__init__()
        self.ln1 = nn.LayerNorm(dim)
        self.conv1 = CausalConv1d(dim, kernel_size, dilations[0])
        self.ln2 = nn.LayerNorm(dim)
        self.conv2 = CausalConv1d(dim, kernel_size, dilations[1])

    def forward(self, x: torch.Tensor, patch: BlockPatch | None = None) -> torch.Tensor:
        first, second = (patch.first, patch.second) if patch is not None else (_same, _same)
        h = first(F.relu(self.conv1(self.ln1(x))))
        return x + second(F.relu(self.conv2(self.ln2(h))))


class NextItNet(nn.Module):
    """Item embedding followed by residual blocks of two dilated causal convolutions each."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.embedding = ItemEmbedding(cfg.num_items + 1, cfg.embed_dim)
        pairs = zip(cfg.dilations[0::2], cfg.dilations[1::2])
        self.blocks = nn.ModuleList(ResidualBlock(cfg.embed_dim, cfg.kernel_size, p) for p in pairs)

    def forward(self, seq: torch.Tensor, patches: nn.ModuleList | None = None) -> torch.Tensor:
        x = self.embedding(seq)
        for i, block in enumerate(self.blocks):
            x = block(x, None if patches is None else patches[i])
        return x


class AttentionBlock(nn.Module):
    """Pre-LN causal self-attention (one head) and feed-forward; projections are prunable."""

    def __init__(self, dim: int):
        super().__init__()
        self.ln1 = nn.LayerNorm(dim)
        self.query, self.key, self.value = PrunableLinear(dim, dim), PrunableLinear(dim, dim), PrunableLinear(dim, dim)
        self.out = PrunableLinear(dim, dim)
        self.ln2 = nn.LayerNorm(dim)
        self.ff1, self.ff2 = PrunableLinear(dim, 4 * dim), PrunableLinear(4 * dim, dim)

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor, patch: BlockPatch | None = None) -> torch.Tensor:
        first, second = (patch.first, patch.second) if patch is not None else (_same, _same)
        h = self.ln1(x)
        a = F.scaled_dot_product_attention(self.query(h), self.key(h), self.value(h), attn_mask=attn_mask)
        x = x + first(self.out(a))
        return x + second(self.ff2(F.relu(self.ff1(self.ln2(x)))))


class CausalTransformer(nn.Module):
    """Item + learned position embeddings, pre-LN blocks, final LayerNorm (paper section 5.6)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.max_seq_len = cfg.max_seq_len
        self.embedding = ItemEmbedding(cfg.num_items + 1, cfg.embed_dim)
        self.position = nn.Parameter(torch.randn(cfg.max_seq_len, cfg.embed_dim) * 0.02)
        self.blocks = nn.ModuleList(AttentionBlock(cfg.embed_dim) for _ in range(cfg.transformer_blocks))
        self.ln_final = nn.LayerNorm(cfg.embed_dim)

    def forward(self, seq: torch.Tensor, patches: nn.ModuleList | None = None) -> torch.Tensor:
        length = seq.shape[1]
        if length > self.max_seq_len:
            raise ValueError(f"sequence length {length} exceeds model.max_seq_len {self.max_seq_len}")
        # Positions count back from the last item so left padding does not shift them.
        x = self.embedding(seq) + self.position[self.max_seq_len - length:]
        idx = torch.arange(length, device=seq.device)
        causal = idx[None, :] <= idx[:, None]  # [query, key]
        # Keys that are padding are hidden; a query may always see itself (no empty rows).
        visible = causal[None] & ((seq != 0)[:, None, :] | torch.eye(length, dtype=torch.bool, device=seq.device)[None])
        for i, block in enumerate(self.blocks):
            x = block(x, visible, None if patches is None else patches[i])
        return self.ln_final(x)


class BagOfItems(nn.Module):
    """The paper's DNN reference: the mean embedding of the items seen so far, through two
    feed-forward layers. Position j sees the bag of items <= j, in no order."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.embedding = ItemEmbedding(cfg.num_items + 1, cfg.embed_dim)
        self.fc1 = PrunableLinear(cfg.embed_dim, cfg.embed_dim)
        self.fc2 = PrunableLinear(cfg.embed_dim, cfg.embed_dim)
        self.blocks = nn.ModuleList()  # no blocks: nothing to patch

    def forward(self, seq: torch.Tensor, patches: nn.ModuleList | None = None) -> torch.Tensor:
        if patches is not None:
            raise ValueError("the bag-of-items backbone takes no patches")
        counts = (seq != 0).cumsum(dim=1).clamp(min=1).unsqueeze(-1)
        bag = self.embedding(seq).cumsum(dim=1) / counts
        return self.fc2(F.relu(self.fc1(bag)))


def build_backbone(cfg: ModelConfig) -> nn.Module:
    if cfg.backbone == "nextitnet":
        return NextItNet(cfg)
    if cfg.backbone == "dnn":
        return BagOfItems(cfg)
    return CausalTransformer(cfg)
