"""A decoder-only transformer language model whose feed-forward blocks are MoE layers.

Pre-norm (RMSNorm), causal self-attention through ``scaled_dot_product_attention``, rotary
or learned positions, an MoE layer every ``moe_every``-th block and dense SwiGLU FFNs between.
Read top to bottom: RMSNorm, Rotary, Attention, Block, MoETransformer.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_mp.moe import MoEConfig, MoELayer, SwiGLU


@dataclass
class TransformerConfig:
    vocab_size: int = 256
    d_model: int = 128
    n_layers: int = 4
    n_heads: int = 4
    max_seq_len: int = 256
    positions: Literal["rope", "learned"] = "rope"
    moe_every: int = 1  # 1: every block is MoE; n: blocks n-1, 2n-1, ... are MoE, the rest dense
    d_ff_dense: Optional[int] = None  # dense FFN width; default top_k * d_ff (equal active parameters)
    tie_embeddings: bool = True
    moe: MoEConfig = field(default_factory=MoEConfig)

    def __post_init__(self) -> None:
        if self.d_model % self.n_heads:
            raise ValueError(f"d_model ({self.d_model}) must be divisible by n_heads ({self.n_heads})")
        if self.positions not in ("rope", "learned"):
            raise ValueError(f"positions must be 'rope' or 'learned', got {self.positions!r}")
        if self.moe_every < 1:
            raise ValueError(f"moe_every must be >= 1, got {self.moe_every}")
        self.moe.d_model, self.moe.n_layers = self.d_model, self.n_layers

    def is_moe(self, layer: int) -> bool:
        return (layer + 1) % self.moe_every == 0


class RMSNorm(nn.Module):
    """RMS normalisation computed in FP32 whatever the input dtype; kept FP32 by the plugin (a norm)."""

    def __init__(self, d: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(d))

    def forward(self, x: Tensor) -> Tensor:
        xf = x.float()
        return (xf * torch.rsqrt(xf.square().mean(-1, keepdim=True) + self.eps) * self.weight.float()).to(x.dtype)


class Rotary(nn.Module):
    """Rotary position embedding; the angle table is built in FP32 (a bf16 angle is off by radians)."""

    keep_fp32 = True

    def __init__(self, head_dim: int, base: float = 10000.0) -> None:
        super().__init__()
        inv_freq = 1.0 / base ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def forward(self, q: Tensor, k: Tensor) -> tuple[Tensor, Tensor]:
        t = torch.arange(q.shape[-2], device=q.device, dtype=torch.float32)
        angles = torch.outer(t, self.inv_freq.float())
        cos, sin = angles.cos(), angles.sin()

        def rotate(x: Tensor) -> Tensor:
            x1, x2 = x.float().chunk(2, dim=-1)
            return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1).to(x.dtype)

        return rotate(q), rotate(k)


class Attention(nn.Module):
    def __init__(self, cfg: TransformerConfig) -> None:
        super().__init__()
        self.n_heads = cfg.n_heads
        self.qkv = nn.Linear(cfg.d_model, 3 * cfg.d_model, bias=False)
        self.proj = nn.Linear(cfg.d_model, cfg.d_model, bias=False)
        self.rotary = Rotary(cfg.d_model // cfg.n_heads) if cfg.positions == "rope" else None

    def forward(self, x: Tensor) -> Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(x).view(b, t, 3, self.n_heads, d // self.n_heads).permute(2, 0, 3, 1, 4)
        if self.rotary is not None:
            q, k = self.rotary(q, k)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.proj(y.transpose(1, 2).reshape(b, t, d))


class Block(nn.Module):
    def __init__(self, cfg: TransformerConfig, ffn: nn.Module) -> None:
        super().__init__()
        self.attn_norm = RMSNorm(cfg.d_model)
        self.attn = Attention(cfg)
        self.ffn_norm = RMSNorm(cfg.d_model)
        self.ffn = ffn

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.attn_norm(x))
        return x + self.ffn(self.ffn_norm(x))


class MoETransformer(nn.Module):
    """``forward(tokens (B, T) long) -> logits (B, T, vocab)``.

    ``make_router(layer)`` and ``make_expert(layer)``, when given, build each MoE layer's router
    and its experts (``make_expert`` is called once per expert); otherwise the defaults are an
    FP32 linear router and stacked SwiGLU experts.
    """

    def __init__(
        self,
        cfg: TransformerConfig,
        make_router: Optional[Callable[[int], nn.Module]] = None,
        make_expert: Optional[Callable[[int], nn.Module]] = None,
    ) -> None:
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.pos = nn.Embedding(cfg.max_seq_len, cfg.d_model) if cfg.positions == "learned" else None
        d_ff_dense = cfg.d_ff_dense or cfg.moe.top_k * cfg.moe.d_ff
        blocks = []
        for layer in range(cfg.n_layers):
            if cfg.is_moe(layer):
                router = make_router(layer) if make_router else None
                experts = [make_expert(layer) for _ in range(cfg.moe.n_experts)] if make_expert else None
                ffn: nn.Module = MoELayer(cfg.moe, router=router, experts=experts)
            else:
                ffn = SwiGLU(cfg.d_model, d_ff_dense)
            blocks.append(Block(cfg, ffn))
        self.blocks = nn.ModuleList(blocks)
        self.norm = RMSNorm(cfg.d_model)
        self.head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        self.apply(self._init)
        if cfg.tie_embeddings:
            self.head.weight = self.embed.weight

    @staticmethod
    def _init(module: nn.Module) -> None:
        if isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, std=0.02)

    @property
    def moe_layers(self) -> list[MoELayer]:
        return [b.ffn for b in self.blocks if isinstance(b.ffn, MoELayer)]

    def forward(self, tokens: Tensor) -> Tensor:
        if tokens.shape[1] > self.cfg.max_seq_len:
            raise ValueError(f"sequence length {tokens.shape[1]} exceeds max_seq_len={self.cfg.max_seq_len}")
        x = self.embed(tokens)
        if self.pos is not None:
            x = x + self.pos(torch.arange(tokens.shape[1], device=tokens.device))
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x))
