"""FSDPMasterWeightPrecision through Lightning's FSDPStrategy. Training runs only on CUDA
(Lightning's FSDP refuses the CPU) and is skipped elsewhere; the plugin's choices are checked
on CPU here and in test_cli.py."""

from __future__ import annotations

import lightning.pytorch as L
import pytest
import torch
from conftest import TinyRegressor, regression_data
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.plugins.precision import FSDPPrecision
from torch import nn
from torch.distributed.fsdp.sharded_grad_scaler import ShardedGradScaler

from lightning_mp import precision_plugin
from lightning_mp.precision import FSDPMasterWeightPrecision

requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="Lightning's FSDP needs CUDA")


def test_factory_gives_fsdp_plugins_and_refuses_what_fsdp_cannot_do():
    plugin = precision_plugin("bf16-master", strategy="fsdp")
    assert isinstance(plugin, FSDPMasterWeightPrecision) and plugin.precision == "bf16-master"
    config = plugin.mixed_precision_config
    assert (config.param_dtype, config.reduce_dtype) == (torch.bfloat16, torch.float32)  # bf16-mixed reduces in bf16
    assert nn.LayerNorm in config._module_classes_to_ignore
    assert type(precision_plugin("bf16-mixed", strategy="fsdp")) is FSDPPrecision
    fp16 = precision_plugin("16-master", strategy="fsdp", init_scale=2.0**8, growth_interval=100)
    assert fp16.precision == "16-master" and fp16.mixed_precision_config.param_dtype == torch.float16
    assert isinstance(fp16.scaler, ShardedGradScaler)  # ours (Lightning's FSDPPrecision drops a given scaler)
    if torch.cuda.is_available():  # without CUDA the scaler disables itself and keeps no settings
        assert fp16.scaler.get_scale() == 2.0**8 and fp16.scaler.get_growth_interval() == 100
    with pytest.raises(ValueError, match="sharded FP32 parameters are the masters"):
        precision_plugin("bf16-master", strategy="fsdp", master="remainder")
    with pytest.raises(TypeError, match="classes only"):
        FSDPMasterWeightPrecision(keep_fp32=["router"])


class Probe(Callback):
    """The dtypes two layers compute with, the optimizer's parameter dtypes, and the first loss."""

    def __init__(self):
        self.seen, self.first_loss = {}, None

    def on_train_start(self, trainer, pl_module):
        self.optimizer_dtypes = {p.dtype for g in trainer.optimizers[0].param_groups for p in g["params"]}
        for name in ("inp", "norm"):
            layer = getattr(pl_module, name)
            layer = getattr(layer, "module", layer)  # inside an FSDP wrapper, whose own hook runs before unsharding
            layer.register_forward_pre_hook(lambda m, args, name=name: self.seen.setdefault(name, m.weight.dtype))

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if self.first_loss is None:
            self.first_loss = outputs["loss"].item()


@pytest.mark.gpu
@requires_cuda
@pytest.mark.parametrize("precision", ["bf16-master", "16-master"])
def test_fsdp_trains_fp32_shards_with_16bit_compute_fp32_norms_and_norm_clipping(precision):
    from lightning.pytorch.strategies import FSDPStrategy

    torch.manual_seed(0)
    probe = Probe()
    trainer = L.Trainer(
        accelerator="cuda", devices=1, strategy=FSDPStrategy(auto_wrap_policy={nn.Linear}),
        plugins=[precision_plugin(precision, strategy="fsdp")], max_steps=40, gradient_clip_val=1.0,
        callbacks=[probe], logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(TinyRegressor(), regression_data())
    dtype = torch.bfloat16 if precision == "bf16-master" else torch.float16
    assert probe.optimizer_dtypes == {torch.float32}  # the sharded flat parameters are the masters
    assert probe.seen == {"inp": dtype, "norm": torch.float32}  # 16-bit compute, norms kept FP32
    assert trainer.strategy.mixed_precision_config.reduce_dtype == torch.float32
    assert trainer.callback_metrics["train_loss"] < probe.first_loss / 2


def test_the_single_device_plugin_refuses_fsdp2_dtensor_parameters(tmp_path):
    """Casting param.data of a DTensor leaves its local shard FP32: silent bf16-mixed, so refused."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    from lightning_mp import MasterWeightPrecision

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'rendezvous'}", rank=0, world_size=1)
    try:
        model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 1))
        fully_shard(model, mesh=init_device_mesh("cpu", (1,)))
        with pytest.raises(ValueError, match=r"does not shard: 0.weight is a DTensor.*use lightning_mp.precision.FSDP2MasterWeightPrecision"):
            MasterWeightPrecision("bf16-master").convert_module(model)
    finally:
        dist.destroy_process_group()


def test_16_master_under_fsdp_scales_the_loss_on_the_plugins_device():
    plugin = FSDPMasterWeightPrecision("16-master", device="cpu", init_scale=1024.0)
    assert plugin.scaler.scale(torch.tensor(2.0)).item() == 2048.0  # a CUDA scaler would leave it at 2.0


def test_bf16_master_under_fsdp_keeps_its_skip_counts_in_checkpoints():
    """A resumed run goes on counting skipped steps (and skips in a row) where it stopped."""
    plugin = FSDPMasterWeightPrecision("bf16-master", device="cpu")
    plugin.skips.skipped_steps, plugin.skips.streak = 3, 2
    resumed = FSDPMasterWeightPrecision("bf16-master", device="cpu")
    resumed.load_state_dict(plugin.state_dict())
    assert (resumed.skipped_steps, resumed.skips.streak) == (3, 2)
    assert "scale" in FSDPMasterWeightPrecision("16-master", device="cpu").state_dict()  # torch's scaler's, as before
