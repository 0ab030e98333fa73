"""MoEModule through Lightning: FP32 routing, every precision mode, subclassing, checkpoints, logging."""

import math

import pytest
import torch
from conftest import trainer
from lightning.pytorch.callbacks import Callback
from torch import nn

import lightning_mp.optim
from lightning_mp import MoEModule, precision_plugin
from lightning_mp.data import ByteTextDataModule
from lightning_mp.model import MoETransformer, TransformerConfig
from lightning_mp.moe import MoELayer, SwiGLU

TINY = dict(d_model=32, n_layers=2, n_heads=2, n_experts=4, top_k=2, d_ff=32, max_seq_len=16, warmup_steps=2)


@pytest.fixture
def corpus(tmp_path):
    root = tmp_path / "corpus"
    root.mkdir()
    for i in range(12):
        (root / f"f{i}.txt").write_text(f"def f{i}(x):\n    return x * {i} + 1  # a line of code\n" * 40)
    return root


def data(corpus, **kw):
    return ByteTextDataModule(corpus, seq_len=16, batch_size=4, val_fraction=0.25, **kw)


class RouterProbe(Callback):
    def on_train_start(self, trainer, pl_module):
        self.seen = []
        for layer in pl_module.moe_layers:
            layer.router.register_forward_hook(lambda m, i, o: self.seen.append((o.dtype, next(m.parameters()).dtype)))


def test_router_logits_are_fp32_under_bf16_master(corpus):
    model = MoEModule(**TINY)
    probe = RouterProbe()
    trainer("bf16-master", max_steps=1, callbacks=[probe]).fit(model, data(corpus))
    assert probe.seen and set(probe.seen) == {(torch.float32, torch.float32)}
    layer = model.moe_layers[0]
    assert layer.router.gate.weight.dtype == torch.float32  # stored FP32, its own master
    assert layer.experts.w1.dtype == torch.bfloat16  # the experts are 16-bit
    assert model.model.blocks[0].attn_norm.weight.dtype == torch.float32


@pytest.mark.parametrize("precision", ["32-true", "bf16-mixed", "bf16-true", "bf16-master", "16-master"])
def test_trains_under_every_precision(corpus, precision):
    # with gradient clipping, as the recipes run it (Lightning's AMP cannot clip for a fused AdamW)
    torch.manual_seed(0)
    model = MoEModule(**TINY, lr=1e-2)
    t = trainer(precision, max_steps=6, limit_val_batches=2, val_check_interval=6, gradient_clip_val=1.0)
    t.fit(model, data(corpus))
    metrics = t.callback_metrics
    assert math.isfinite(metrics["train/loss"].item()) and math.isfinite(metrics["val/loss"].item())
    assert metrics["val/loss"].item() < math.log(256)  # better than uniform over bytes


def test_logs_losses_routing_and_throughput(corpus):
    t = trainer("bf16-master", max_steps=2, limit_val_batches=1, val_check_interval=2)
    t.fit(MoEModule(**TINY, capacity_factor=1.0), data(corpus))
    m = t.callback_metrics
    for key in ("train/loss", "train/aux_loss", "train/z_loss", "moe/layer0/load_expert3", "moe/layer1/imbalance",
                "moe/layer0/router_entropy", "moe/drop_frac", "train/tokens_per_sec", "val/loss", "val/ppl",
                "val/bits_per_byte"):
        assert key in m, key
    assert sum(m[f"moe/layer0/load_expert{e}"].item() for e in range(4)) == pytest.approx(1.0)
    assert m["val/ppl"].item() == pytest.approx(math.exp(m["val/loss"].item()), rel=1e-5)
    assert m["train/tokens_per_sec"].item() > 0


class MLPExpertMoE(MoEModule):
    def make_expert(self, layer):
        return nn.Sequential(nn.Linear(self.config.d_model, 48), nn.GELU(), nn.Linear(48, self.config.d_model))

    def make_router(self, layer):
        return nn.Sequential(nn.Linear(self.config.d_model, 16), nn.Tanh(), nn.Linear(16, self.config.moe.n_experts))


def test_subclass_with_custom_experts_and_router_trains(corpus):
    torch.manual_seed(0)
    model = MLPExpertMoE(**TINY)
    model.configure_model()
    before = model.moe_layers[0].experts[0][0].weight.detach().clone()
    t = trainer("bf16-master", max_steps=4)
    t.fit(model, data(corpus))
    layer = model.moe_layers[0]
    assert isinstance(layer.experts, nn.ModuleList) and len(layer.experts) == 4
    assert layer.experts[0][0].weight.dtype == torch.bfloat16
    assert layer.router[0].weight.dtype == torch.float32  # the custom router stays FP32
    assert not torch.equal(layer.experts[0][0].weight.float(), before)


def test_load_from_checkpoint_round_trips(corpus, tmp_path):
    torch.manual_seed(0)
    model = MoEModule(**{**TINY, "top_k": 1, "n_shared_experts": 1})
    t = trainer("bf16-master", max_steps=3)
    t.fit(model, data(corpus))
    t.save_checkpoint(tmp_path / "m.ckpt")
    loaded = MoEModule.load_from_checkpoint(tmp_path / "m.ckpt")
    assert loaded.hparams == model.hparams and loaded.config == model.config
    store = t.precision_plugin.store
    for p, q in zip(model.parameters(), loaded.parameters()):
        assert q.dtype == torch.float32 and torch.equal(q, store.value(p))
    tokens = torch.randint(0, 256, (2, 16))
    assert loaded(tokens).shape == (2, 16, 256)


def test_configure_model_can_be_replaced():
    class Custom(MoEModule):
        def configure_model(self):
            if self.model is None:
                self.model = nn.Sequential(nn.Embedding(256, 8), nn.Linear(8, 256))

    m = Custom()
    assert m(torch.randint(0, 256, (2, 5))).shape == (2, 5, 256) and m.moe_layers == []


def test_moe_every_interleaves_dense_blocks():
    model = MoETransformer(TransformerConfig(d_model=16, n_layers=4, n_heads=2, moe_every=2))
    kinds = [type(b.ffn) for b in model.blocks]
    assert kinds == [SwiGLU, MoELayer, SwiGLU, MoELayer]
    assert model.blocks[0].ffn.w1.out_features == 2 * 256  # dense width: top_k * d_ff
    assert model.head.weight is model.embed.weight
    with pytest.raises(ValueError, match="divisible"):
        TransformerConfig(d_model=10, n_heads=3)


def test_learned_positions_and_max_seq_len():
    model = MoETransformer(TransformerConfig(d_model=16, n_layers=1, n_heads=2, positions="learned", max_seq_len=8))
    assert model(torch.randint(0, 256, (1, 8))).shape == (1, 8, 256)
    with pytest.raises(ValueError, match="max_seq_len"):
        model(torch.randint(0, 256, (1, 9)))


def test_optimizer_groups_and_schedule(corpus):
    model = MoEModule(**{**TINY, "warmup_steps": 4}, lr=1e-2, min_lr_ratio=0.1)
    t = trainer("32-true", max_steps=20)
    t.fit(model, data(corpus))
    opt = t.optimizers[0]
    decay, no_decay = opt.param_groups
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    no_decay_ids = {id(p) for p in no_decay["params"]}
    assert id(model.model.embed.weight) in no_decay_ids and id(model.model.norm.weight) in no_decay_ids
    assert id(model.moe_layers[0].experts.w1) not in no_decay_ids
    fn = t.lr_scheduler_configs[0].scheduler.lr_lambdas[0]
    assert [fn(s) for s in (0, 3)] == [0.25, 1.0]  # linear warm-up over 4 steps
    assert fn(20) == pytest.approx(0.1) and fn(12) == pytest.approx(0.55)  # cosine to min_lr_ratio


def test_decay_steps_ends_the_cosine_early_and_holds_the_final_lr(corpus):
    model = MoEModule(**{**TINY, "warmup_steps": 4}, lr=1e-2, min_lr_ratio=0.1, decay_steps=12)
    t = trainer("32-true", max_steps=20)
    t.fit(model, data(corpus))
    fn = t.lr_scheduler_configs[0].scheduler.lr_lambdas[0]
    assert fn(3) == 1.0 and fn(8) == pytest.approx(0.55)  # half-way from step 4 to step 12
    assert fn(12) == fn(16) == fn(19) == pytest.approx(0.1)
    assert t.optimizers[0].param_groups[0]["lr"] == pytest.approx(1e-3)


@pytest.mark.slow
def test_tiny_model_beats_unigram_on_the_stdlib_under_bf16_master():
    """A few hundred CPU steps on the default corpus: validation bits per byte well under the unigram entropy."""
    torch.manual_seed(0)
    dm = ByteTextDataModule(seq_len=64, batch_size=16)
    model = MoEModule(d_model=64, n_layers=2, n_heads=4, n_experts=4, top_k=2, d_ff=128, max_seq_len=64,
                      lr=5e-3, warmup_steps=20)
    t = trainer("bf16-master", max_steps=250, limit_val_batches=20, val_check_interval=250)
    t.fit(model, dm)
    bpb = t.callback_metrics["val/bits_per_byte"].item()
    assert bpb < dm.unigram_bits_per_byte() - 1.0
    assert t.precision_plugin.skipped_steps == 0


def test_constructor_arguments_reach_the_model_configs():
    m = MoEModule(vocab_size=100, d_model=48, n_layers=3, n_heads=3, n_experts=6, top_k=1, d_ff=40, moe_every=2,
                  capacity_factor=1.5, score_func="sigmoid", n_shared_experts=1, aux_loss_coef=0.5, z_loss_coef=0.25,
                  bias_update_rate=0.01, max_seq_len=32, positions="learned")
    c = m.config
    assert (c.vocab_size, c.d_model, c.n_layers, c.n_heads, c.moe_every, c.max_seq_len, c.positions) == (
        100, 48, 3, 3, 2, 32, "learned")
    assert (c.moe.d_model, c.moe.n_experts, c.moe.top_k, c.moe.d_ff, c.moe.capacity_factor, c.moe.score_func,
            c.moe.n_shared_experts, c.moe.aux_loss_coef, c.moe.z_loss_coef, c.moe.bias_update_rate) == (
        48, 6, 1, 40, 1.5, "sigmoid", 1, 0.5, 0.25, 0.01)


@pytest.mark.parametrize("master, moment_dtype", [("remainder", "float32"), ("stochastic", "bfloat16")])
def test_storage_policies_get_lightning_mp_adamw(corpus, master, moment_dtype):
    model = MoEModule(**TINY, moment_dtype=moment_dtype)
    t = trainer(precision_plugin("bf16-master", master=master), max_steps=3)
    t.fit(model, data(corpus))
    opt = t.optimizers[0]
    assert isinstance(opt, lightning_mp.optim.AdamW) and opt.master == master
    assert opt.moment_dtype == getattr(torch, moment_dtype)
    assert [g["weight_decay"] for g in opt.param_groups] == [model.hparams.weight_decay, 0.0]
    assert torch.isfinite(t.callback_metrics["train/loss"])


@pytest.mark.parametrize("precision", ["32-true", "bf16-mixed"])
def test_8bit_moments_train_fp32_weights_under_lightnings_precisions(corpus, precision):
    model = MoEModule(**TINY, moment_dtype="8bit")
    t = trainer(precision, max_steps=3)
    t.fit(model, data(corpus))
    opt = t.optimizers[0]
    assert isinstance(opt, lightning_mp.optim.AdamW) and opt.moment_dtype == "8bit"
    weight = model.moe_layers[0].experts.w1
    assert weight.dtype == torch.float32
    assert {v.dtype for v in opt.state[weight].values() if v.numel() == weight.numel()} == {torch.int8, torch.uint8}


@pytest.mark.parametrize("precision, why", [
    ("bf16-true", "its bf16 weights keep no FP32 values"),
    ("16-true", "its fp16 weights keep no FP32 values"),
    ("64-true", "its weights are float64"),
])
@pytest.mark.parametrize("moment_dtype", ["8bit", "bfloat16"])
def test_low_bit_moments_under_a_precision_they_cannot_step_is_one_line_before_training(corpus, precision, why,
                                                                                         moment_dtype):
    model = MoEModule(**TINY, moment_dtype=moment_dtype)
    t = trainer(precision, max_steps=2)
    with pytest.raises(ValueError) as info:
        t.fit(model, data(corpus))
    message = str(info.value)
    assert message.startswith(f"moment_dtype={moment_dtype!r} needs lightning_mp.optim.AdamW, which cannot step "
                              f"precision={precision!r} ({why}): use 'bf16-master'")
    assert "\n" not in message and t.global_step == 0


def test_print_before_fit_says_where_the_layers_come_from():
    model = MoEModule(n_layers=2, n_experts=4)
    text = repr(model)
    assert "layers not built yet" in text and "configure_model()" in text and "n_experts=4" in text
    model.configure_model()
    text = repr(model)
    assert "not built" not in text and "MoETransformer" in text and "MoELayer" in text


@pytest.mark.parametrize("accumulate", [1, 4])
def test_expert_bias_moves_once_per_optimizer_step(corpus, accumulate):
    class Watch(Callback):
        def __init__(self):
            self.biases = []

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            self.biases.append(torch.cat([m.balance.bias.clone() for m in pl_module.moe_layers]))

    torch.manual_seed(0)
    model = MoEModule(d_model=32, n_layers=2, n_heads=2, n_experts=4, d_ff=32, bias_update_rate=0.01, max_seq_len=16)
    watch = Watch()
    t = trainer("32-true", max_steps=3, accumulate_grad_batches=accumulate, callbacks=[watch])
    t.fit(model, data(corpus))
    moved = [i for i in range(len(watch.biases)) if not torch.equal(watch.biases[i], watch.biases[i - 1] if i else
                                                                    torch.zeros_like(watch.biases[0]))]
    assert moved == [accumulate * s - 1 for s in (1, 2, 3)]  # the last micro-batch of each step
    assert watch.biases[-1].abs().max() <= 3 * 0.01 * 2  # at most 3 moves of at most 2 x rate (centred)
    assert torch.allclose(watch.biases[-1].view(2, 4).sum(-1), torch.zeros(2), atol=1e-6)  # centred per layer


def test_expert_bias_and_load_follow_the_steps_under_manual_optimization_with_two_optimizers(corpus):
    class ManualMoE(MoEModule):
        def __init__(self, **kwargs):
            super().__init__(**kwargs)
            self.automatic_optimization = False

        def configure_optimizers(self):
            experts = [p for n, p in self.named_parameters() if ".experts." in n]
            rest = [p for n, p in self.named_parameters() if ".experts." not in n]
            return torch.optim.AdamW(experts, lr=1e-3), torch.optim.AdamW(rest, lr=1e-3)

        def training_step(self, batch, batch_idx):
            loss = super().training_step(batch, batch_idx)
            for opt in self.optimizers():
                opt.zero_grad()
            self.manual_backward(loss)
            for opt in self.optimizers():
                opt.step()

    class Watch(Callback):
        def __init__(self):
            self.biases, self.loads = [], []

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            self.biases.append(torch.cat([m.balance.bias.clone() for m in pl_module.moe_layers]))
            metrics = trainer.callback_metrics
            self.loads.append([metrics[f"moe/layer1/load_expert{e}"].item() for e in range(4)]
                              + [metrics["moe/layer1/imbalance"].item()])

    torch.manual_seed(0)
    model = ManualMoE(d_model=32, n_layers=2, n_heads=2, n_experts=4, d_ff=32, bias_update_rate=0.01, max_seq_len=16)
    watch = Watch()
    trainer("bf16-master", max_steps=6, callbacks=[watch]).fit(model, data(corpus))  # 2 optimizers: 3 batches
    before = [torch.zeros_like(watch.biases[0])] + watch.biases[:-1]
    assert len(watch.biases) == 3
    assert all(not torch.equal(b, a) for a, b in zip(before, watch.biases))  # moved at every batch...
    assert watch.biases[-1].abs().max() <= 3 * 0.01 * 2  # ...once: the second optimizer's step found no counts
    for *shares, imbalance in watch.loads:  # one batch's load, not emptied by the second optimizer's step
        assert sum(shares) == pytest.approx(1.0) and imbalance == pytest.approx(max(shares) / 0.25)
