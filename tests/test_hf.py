"""Hugging Face models under the plugin: tied weights stay tied, checkpoints load into plain FP32 models,
rotary tables stay FP32. Tiny random configs, built here (no download)."""

from __future__ import annotations

import lightning.pytorch as L
import pytest
import torch
from conftest import MODE_IDS, MODES, fp32_values, mode_adamw, mode_plugin, trainer
from torch.utils.data import DataLoader, TensorDataset

transformers = pytest.importorskip("transformers")

modes = pytest.mark.parametrize("mode", MODES, ids=MODE_IDS)


def llama_config():
    return transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
                                    tie_word_embeddings=True, bos_token_id=0, eos_token_id=1)


def gpt2_config():
    return transformers.GPT2Config(vocab_size=64, n_embd=32, n_layer=2, n_head=4, n_positions=64, bos_token_id=0,
                                   eos_token_id=1)


BUILD = {
    "llama": lambda: transformers.LlamaForCausalLM(llama_config()),
    "gpt2": lambda: transformers.GPT2LMHeadModel(gpt2_config()),
}


class CausalLM(L.LightningModule):
    def __init__(self, mode, arch):
        super().__init__()
        self.mode = mode
        self.model = BUILD[arch]()

    def training_step(self, batch, batch_idx):
        return self.model(input_ids=batch[0], labels=batch[0]).loss.float()

    def configure_optimizers(self):
        return mode_adamw(self.mode, self.parameters(), lr=1e-2)


def tokens(n=8, length=16):
    g = torch.Generator().manual_seed(0)
    return DataLoader(TensorDataset(torch.randint(0, 64, (n, length), generator=g)), batch_size=4)


@modes
@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_hf_model_stays_tied_and_saves_fp32_values_a_plain_model_loads(mode, arch, tmp_path):
    torch.manual_seed(0)
    lm = CausalLM(mode, arch)
    t = trainer(mode_plugin(mode), max_steps=3)
    t.fit(lm, tokens())
    hf = lm.model
    embeddings = hf.get_input_embeddings().weight
    assert hf.get_output_embeddings().weight is embeddings  # still tied
    assert sum(p is embeddings for g in t.optimizers[0].param_groups for p in g["params"]) == 1
    assert embeddings.dtype == (torch.float16 if mode[0] == "16-master" else torch.bfloat16)
    hf.save_pretrained(tmp_path / "hf")  # Hugging Face's own save: the FP32 values
    plain = type(hf).from_pretrained(tmp_path / "hf", dtype=torch.float32)
    values = fp32_values(t)
    for name, p in plain.named_parameters():
        assert p.dtype == torch.float32 and torch.equal(p, values[f"model.{name}"]), name
    assert plain.get_output_embeddings().weight is plain.get_input_embeddings().weight


@modes
def test_llama_rotary_angles_equal_bf16_mixed(mode):
    # inv_freq is a buffer: it stays FP32, so cos/sin at positions below 4096 are bf16-mixed's exactly
    # (an inv_freq cast to bf16 puts angles off by up to 1.8 rad there).
    tables = {}
    for name, plugin, lm in [("bf16-mixed", "bf16-mixed", CausalLM(("bf16-master", "fp32"), "llama")),
                             ("ours", mode_plugin(mode), CausalLM(mode, "llama"))]:
        t = trainer(plugin, max_steps=1)
        t.fit(lm, tokens())
        rotary = lm.model.model.rotary_emb
        assert rotary.inv_freq.dtype == torch.float32
        x = torch.zeros(1, 4096, 32, dtype=torch.bfloat16)
        with t.precision_plugin.forward_context():
            tables[name] = rotary(x, torch.arange(4096)[None])
    assert all(torch.equal(a, b) for a, b in zip(tables["ours"], tables["bf16-mixed"]))


class Sampling(CausalLM):  # a common LLM pattern: sample text at the end of each validation
    def validation_step(self, batch, batch_idx):
        self.log("val_loss", self.model(input_ids=batch[0], labels=batch[0]).loss.float())

    def on_validation_epoch_end(self):  # outside the step: no autocast
        prompt = torch.tensor([[0, 5, 9]])
        self.samples = self.model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=4,
                                           do_sample=False, pad_token_id=1)


@pytest.mark.parametrize("mode", [("bf16-master", "auto"), ("16-master", "fp32")], ids=["bf16-master", "16-master"])
def test_llama_generates_outside_the_step_and_after_fit(mode):
    # Llama's RMSNorm multiplies by its FP32 weight: outside autocast its FP32 output reached the
    # 16-bit q_proj and failed, where bf16-true and bf16-mixed run.
    torch.manual_seed(0)
    lm = Sampling(mode, "llama")
    t = trainer(mode_plugin(mode), max_steps=2, val_check_interval=1, limit_val_batches=1)
    t.fit(lm, tokens(), tokens())
    assert lm.samples.shape == (1, 7) and lm.samples[0, :3].tolist() == [0, 5, 9]
    logits = lm.model(input_ids=torch.tensor([[0, 5, 9]])).logits  # after fit, called directly
    assert logits.dtype == lm.model.get_input_embeddings().weight.dtype and logits.isfinite().all()
