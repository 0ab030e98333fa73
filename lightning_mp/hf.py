"""Hugging Face MoE models in and out of ``MoEModule``: fine-tune a Mixtral or Qwen3-MoE model
here, evaluate and serve the result with ``transformers``.

The design wraps their model rather than rebuilding it: attention, rotary embeddings, norms and
embeddings stay Hugging Face's own modules, so nothing about them can drift from ``transformers``;
only each sparse MoE block is swapped for an equivalent :class:`~lightning_mp.moe.MoELayer`,
which routes in FP32 (their routers run in the compute dtype), gives the load-balancing and
z-losses per layer and the routing metrics. Export is the inverse map of the weights into a
fresh ``transformers`` model, from the FP32 values of the module's ``state_dict``.

    module = MoEModule.from_hf(AutoModelForCausalLM.from_pretrained(...), lr=3e-5)
    lightning_mp.Trainer(precision="bf16-master").fit(module, data)
    to_hf(module).save_pretrained("out")
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from lightning_mp.moe import MoEConfig, MoELayer

SUPPORTED = ("MixtralSparseMoeBlock", "Qwen3MoeSparseMoeBlock")


def moe_config(config: Any) -> MoEConfig:
    """Our layer's options for a Hugging Face Mixtral or Qwen3-MoE config."""
    if config.model_type == "mixtral":
        if config.num_experts_per_tok == 1:  # Mixtral renormalises a lone top-1 weight to 1
            raise ValueError("a top-1 Mixtral weighs every expert output by 1 (its router gets no gradient "
                             "from the loss); lightning_mp.hf converts Mixtral models with num_experts_per_tok >= 2")
        return MoEConfig(d_model=config.hidden_size, d_ff=config.intermediate_size, n_experts=config.num_local_experts,
                         top_k=config.num_experts_per_tok, router_jitter=config.router_jitter_noise,
                         aux_loss_coef=config.router_aux_loss_coef)
    if config.model_type == "qwen3_moe":
        return MoEConfig(d_model=config.hidden_size, d_ff=config.moe_intermediate_size, n_experts=config.num_experts,
                         top_k=config.num_experts_per_tok,
                         norm_topk_prob=bool(config.norm_topk_prob) if config.num_experts_per_tok > 1 else None,
                         aux_loss_coef=config.router_aux_loss_coef)
    raise ValueError(f"model_type {config.model_type!r}: lightning_mp.hf converts mixtral and qwen3_moe models")


def layer_from_block(block: nn.Module, cfg: MoEConfig) -> MoELayer:
    """An :class:`MoELayer` computing what ``block`` computes, with its weights (copied, FP32)."""
    layer = MoELayer(cfg)
    d_ff = cfg.d_ff
    gate_up, down = block.experts.gate_up_proj.detach().float(), block.experts.down_proj.detach().float()
    with torch.no_grad():
        layer.router.gate.weight.copy_(block.gate.weight.float())
        layer.experts.w1.copy_(gate_up[:, :d_ff].transpose(1, 2))  # HF: [gate; up] rows, (E, 2 d_ff, d)
        layer.experts.w3.copy_(gate_up[:, d_ff:].transpose(1, 2))
        layer.experts.w2.copy_(down.transpose(1, 2))  # HF: (E, d, d_ff)
    return layer


def block_state(layer_state: dict[str, Tensor], prefix: str) -> dict[str, Tensor]:
    """Our layer's weights (``{prefix}router.gate.weight``...) as the Hugging Face block's."""
    w1, w3, w2 = (layer_state[f"{prefix}experts.{n}"] for n in ("w1", "w3", "w2"))
    return {
        f"{prefix}gate.weight": layer_state[f"{prefix}router.gate.weight"],
        f"{prefix}experts.gate_up_proj": torch.cat([w1, w3], dim=2).transpose(1, 2).contiguous(),
        f"{prefix}experts.down_proj": w2.transpose(1, 2).contiguous(),
    }


class HFCausalLM(nn.Module):
    """A Hugging Face causal LM with its sparse MoE blocks replaced, in place, by :class:`MoELayer`;
    ``forward(tokens)`` returns the logits, as ``MoETransformer`` does."""

    def __init__(self, hf_model: nn.Module) -> None:
        super().__init__()
        self.config = hf_model.config
        cfg = moe_config(self.config)
        self.hf = hf_model.float()  # in place: a copy would double the memory of a large model
        blocks = [(name, m) for name, m in self.hf.named_modules() if type(m).__name__ in SUPPORTED]
        if not blocks:
            raise ValueError(f"no {' or '.join(SUPPORTED)} in {type(hf_model).__name__}")
        for name, block in blocks:
            parent, _, child = name.rpartition(".")
            setattr(self.hf.get_submodule(parent), child, layer_from_block(block, cfg))

    def forward(self, tokens: Tensor) -> Tensor:
        return self.hf(input_ids=tokens, use_cache=False).logits


def to_hf(module: nn.Module) -> nn.Module:
    """A fresh FP32 ``transformers`` model holding ``module``'s weights (an ``MoEModule`` from
    :meth:`~lightning_mp.MoEModule.from_hf`, or its :class:`HFCausalLM`), exact FP32 values
    under ``MasterWeightPrecision`` included; ready for ``save_pretrained``."""
    from transformers import AutoModelForCausalLM

    wrapper = module if isinstance(module, HFCausalLM) else getattr(module, "model", None)
    if not isinstance(wrapper, HFCausalLM):
        raise TypeError("to_hf takes an MoEModule made by MoEModule.from_hf (or its HFCausalLM)")
    state = {k: v.float() for k, v in module.state_dict().items()}  # the FP32 values (the master store's hook)
    root = "model.hf." if wrapper is not module else "hf."
    ours = {k[len(root):]: v for k, v in state.items() if k.startswith(root)}
    converted: dict[str, Tensor] = {}
    for name, m in wrapper.hf.named_modules():
        if isinstance(m, MoELayer):
            prefix = f"{name}."
            converted.update(block_state(ours, prefix))
            ours = {k: v for k, v in ours.items() if not k.startswith(prefix)}
    converted.update(ours)
    model = AutoModelForCausalLM.from_config(wrapper.config, torch_dtype=torch.float32)
    missing, unexpected = model.load_state_dict(converted, strict=False)
    missing = [k for k in missing if k != "lm_head.weight" or not model.config.tie_word_embeddings]
    if missing or unexpected:
        raise RuntimeError(f"to_hf: weights that do not map: missing {missing[:3]}, unexpected {unexpected[:3]}")
    return model.eval()
