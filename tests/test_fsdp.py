"""FSDPMasterWeightPrecision through Lightning's FSDPStrategy. Training runs only on CUDA
(Lightning's FSDP refuses the CPU) and is skipped elsewhere; the plugin's choices are checked
on CPU here and in test_cli.py."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

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
        with pytest.raises(ValueError, match=r"does not shard: 0.weight is a DTensor.*MixedPrecisionPolicy"):
            MasterWeightPrecision("bf16-master").convert_module(model)
    finally:
        dist.destroy_process_group()


def test_16_master_under_fsdp_scales_the_loss_on_the_plugins_device():
    plugin = FSDPMasterWeightPrecision("16-master", device="cpu", init_scale=1024.0)
    assert plugin.scaler.scale(torch.tensor(2.0)).item() == 2048.0  # a CUDA scaler would leave it at 2.0


CPU_FSDP_SCRIPT = textwrap.dedent('''
    import json, sys
    import torch, lightning.pytorch as L
    from lightning.pytorch.strategies import FSDPStrategy
    from torch.distributed.fsdp import FullyShardedDataParallel
    from torch.utils.data import DataLoader, Subset
    sys.path.insert(0, {tests!r})
    from conftest import TinyRegressor, regression_data
    from lightning_mp import precision_plugin

    args = json.loads(sys.argv[1])

    class CPUFSDPStrategy(FSDPStrategy):
        """Test only: Lightning's FSDP on CPU processes (its guard checks the exact type; torch
        needs device_id=cpu, which Lightning leaves out)."""

        def _setup_model(self, model):
            return FullyShardedDataParallel(model, mixed_precision=self.mixed_precision_config,
                                            device_id=torch.device("cpu"), **self.kwargs)

    class Save(L.Callback):
        def on_train_end(self, trainer, pl_module):
            state = trainer.strategy.lightning_module_state_dict()
            if kind == "fsdp":  # sharded: torch's full state dict crashes on CPU (FlatParamHandle.to_cpu)
                state = {{k: gather(v) for k, v in state.items()}}
            if trainer.global_rank == 0:
                torch.save({{k: v.clone() for k, v in state.items()}}, f"{{args['out']}}/weights.pt")

    def gather(value):
        if hasattr(value, "full_tensor"):
            return value.full_tensor()
        full = torch.empty(value.size()) if torch.distributed.get_rank() == 0 else None
        value.gather(dst=0, out=full)  # a ShardedTensor
        return full if full is not None else torch.empty(0)

    name, kind = args["precision"], args["strategy"]
    if kind == "fsdp":
        from torch.distributed.fsdp.wrap import ModuleWrapPolicy
        strategy = CPUFSDPStrategy(auto_wrap_policy=ModuleWrapPolicy({{torch.nn.Linear}}),
                                   state_dict_type="sharded")
        plugin = precision_plugin(name, strategy="fsdp", device="cpu")
    else:
        strategy, plugin = "ddp", precision_plugin(name, grad_reduce_dtype="fp32")
    trainer = L.Trainer(accelerator="cpu", devices=2, strategy=strategy, plugins=[plugin], max_steps=args["steps"],
                        use_distributed_sampler=False, callbacks=[Save()], logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False,
                        gradient_clip_val=args.get("clip"))
    torch.manual_seed(0)
    model = TinyRegressor(lr=1e-2)
    dataset = regression_data(n=64).dataset
    mine = [i for i in range(len(dataset)) if (i // 8) % 2 == trainer.global_rank]
    trainer.fit(model, DataLoader(Subset(dataset, mine), batch_size=8))
''')


def _cpu_run(tmp_path, name, **args):
    out = tmp_path / name
    out.mkdir()
    script = tmp_path / "cpu_fsdp.py"
    script.write_text(CPU_FSDP_SCRIPT.format(tests=str(Path(__file__).parent)))
    result = subprocess.run([sys.executable, str(script), json.dumps({"out": str(out), "steps": 4, **args})],
                            cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return torch.load(out / "weights.pt")


@pytest.mark.slow
def test_fsdp_plugin_trains_on_two_cpu_processes_as_ddp_does(tmp_path):
    """FSDP's FP32 flat shards, bf16 compute, FP32 reduce-scatter and clipping by the sharded norm,
    against DDP with our plugin reducing in FP32, on the same global batches. The per-rank bf16
    gradients agree only to bf16 rounding (a near-zero gradient can change sign, and Adam's first
    step moves its weight by +-lr either way), so the updates are compared, not the bits."""
    fsdp = _cpu_run(tmp_path, "fsdp", precision="bf16-master", strategy="fsdp", clip=0.5)
    ddp = _cpu_run(tmp_path, "ddp", precision="bf16-master", strategy="ddp", clip=0.5)
    assert fsdp.keys() == ddp.keys()
    torch.manual_seed(0)
    start = TinyRegressor(lr=1e-2).state_dict()  # the scripts' initial weights
    for key in ddp:
        assert fsdp[key].dtype == torch.float32, key  # the FP32 shards are the masters
        ours, theirs = fsdp[key] - start[key], ddp[key] - start[key]
        assert theirs.abs().max() > 1e-3, key  # it trained
        agree = ((ours - theirs).abs() <= 1e-3).float().mean()  # 1e-3: a tenth of an Adam step at lr 1e-2
        assert agree >= 0.9, (key, agree)  # all but the sign flips of near-zero gradients
