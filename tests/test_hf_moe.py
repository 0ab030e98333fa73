"""Hugging Face Mixtral and Qwen3-MoE in and out of MoEModule (tiny random configs, no downloads)."""

import copy

import pytest
import torch

from lightning_mp import MoEModule
from lightning_mp.hf import to_hf
from lightning_mp.moe import MoELayer

from conftest import trainer

transformers = pytest.importorskip("transformers")

TINY = dict(vocab_size=96, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            max_position_embeddings=64, num_experts_per_tok=2)


def tiny(kind: str, **extra):
    torch.manual_seed(0)
    if kind == "mixtral":
        config = transformers.MixtralConfig(**TINY, intermediate_size=48, num_local_experts=4, **extra)
    else:
        config = transformers.Qwen3MoeConfig(**TINY, moe_intermediate_size=48, num_experts=4, head_dim=8, **extra)
    config._attn_implementation = "eager"
    config._experts_implementation = "eager"  # HF's loop over experts: it runs in float64 (grouped_mm does not)
    # float64, so that the two implementations' different summation orders move the logits by at most
    # gamma_n(2**-53) of the sums' magnitudes (n <= 96 terms: under 1e-12). MoELayer routes in float32 by
    # design: a few float32 roundings (2**-24 relative) of router probabilities below 1, which reach the
    # logits (below 10 here) through two layers: atol 1e-6. A weight in the wrong place moves them by > 1e-3.
    model = transformers.AutoModelForCausalLM.from_config(config).double().eval()
    with torch.no_grad():  # HF's own init leaves the routers at zero: every token would tie
        for p in model.parameters():
            p.copy_(p.normal_(std=0.1).float())  # float32 values, so a float32 copy of them is exact
    return model


CASES = [("mixtral", {}), ("qwen3_moe", {"norm_topk_prob": False}), ("qwen3_moe", {"norm_topk_prob": True})]


@pytest.mark.parametrize("kind,extra", CASES, ids=[f"{k}-{e}" for k, e in CASES])
def test_import_and_export_keep_the_logits(kind, extra):
    reference = tiny(kind, **extra)
    tokens = torch.randint(0, 96, (2, 24))
    with torch.no_grad():
        expected = reference(input_ids=tokens).logits
    module = MoEModule.from_hf(copy.deepcopy(reference)).double().eval()
    assert len(module.moe_layers) == 2 and all(isinstance(m, MoELayer) for m in module.moe_layers)
    with torch.no_grad():
        ours = module(tokens)
    torch.testing.assert_close(ours, expected, rtol=0, atol=1e-6)
    exported = to_hf(module).double()
    assert type(exported) is type(reference)
    with torch.no_grad():
        torch.testing.assert_close(exported(input_ids=tokens).logits, ours, rtol=0, atol=1e-6)
    for key, value in reference.state_dict().items():
        assert torch.equal(exported.state_dict()[key], value), key  # every weight back where it was


@pytest.mark.slow
def test_a_bf16_master_fine_tune_of_an_imported_model_trains_and_exports(tmp_path):
    reference = tiny("qwen3_moe").float()
    module = MoEModule.from_hf(copy.deepcopy(reference), lr=1e-3, warmup_steps=1, decay_steps=10)
    torch.manual_seed(1)
    tokens = torch.randint(0, 96, (16, 17))
    data = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(tokens[:, :-1], tokens[:, 1:]), batch_size=4)
    t = trainer("bf16-master", max_steps=8, limit_val_batches=0)
    t.fit(module, data)
    assert all(m.router.gate.weight.dtype == torch.float32 for m in module.moe_layers)  # routers stay FP32
    losses = t.callback_metrics
    assert torch.isfinite(losses["train/loss"])
    exported = to_hf(module)
    moved = [k for k, v in reference.state_dict().items() if not torch.equal(exported.state_dict()[k], v)]
    assert any("mlp.experts" in k for k in moved) and any("mlp.gate" in k for k in moved) and any("self_attn" in k
                                                                                                for k in moved)
    for key in ("model.layers.0.mlp.experts.gate_up_proj", "model.layers.0.self_attn.q_proj.weight"):
        w = exported.state_dict()[key]
        assert (w != w.bfloat16().float()).any(), key  # the FP32 masters' values, not the bf16 weights
    exported.save_pretrained(tmp_path / "out")
    again = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    assert all(v.dtype == torch.float32 for v in again.state_dict().values())
    with torch.no_grad():
        torch.testing.assert_close(again(input_ids=tokens[:2]).logits, exported(input_ids=tokens[:2]).logits)
