"""Lightning's throughput monitors (the Trainer callback, Fabric's utility that litgpt builds)
measure MFU against the peak FLOP/s of the 16-bit dtype a ``*-master`` run computes in.

The peak comes from ``get_available_flops(device, dtype)``, which knows CUDA and TPU chips only:
here it is replaced by an H100 SXM's row of Lightning's own table, and each test reads which
peak the monitor took, and the MFU it logs.
"""

from __future__ import annotations

import lightning as L
import pytest
import torch
from lightning.fabric.utilities import throughput as fabric_throughput
from lightning.pytorch.callbacks import ThroughputMonitor
from lightning.pytorch.callbacks import throughput_monitor as trainer_throughput
from lightning.pytorch.demos.boring_classes import BoringModel
from lightning.pytorch.loggers import CSVLogger

import lightning_mp
from lightning_mp.precision import FSDP2MasterWeightPrecision, FSDPMasterWeightPrecision
from lightning_mp.fabric import FSDP2MasterWeightPrecision as FabricFSDP2MasterWeightPrecision

H100_SXM = {torch.float32: 66.9e12, torch.bfloat16: 989.4e12, torch.float16: 989.4e12}  # Lightning's table


@pytest.fixture
def h100(monkeypatch):
    """Each monitor asks an H100's peak for the dtype its lookup derived from the plugin."""
    asked: list[torch.dtype] = []

    def available_flops(device, dtype):
        asked.append(dtype)
        return int(H100_SXM[dtype])

    monkeypatch.setattr(fabric_throughput, "get_available_flops", available_flops)
    monkeypatch.setattr(trainer_throughput, "get_available_flops", available_flops)
    return asked


class Counted(BoringModel):
    flops_per_batch = 10**12


PEAKS = [("32-true", 66.9e12), ("bf16-mixed", 989.4e12), ("bf16-true", 989.4e12),
         ("bf16-master", 989.4e12), ("16-master", 989.4e12)]


@pytest.mark.parametrize(("precision", "peak"), PEAKS)
def test_trainer_monitor_measures_mfu_against_the_16bit_peak(precision, peak, h100, tmp_path):
    monitor = ThroughputMonitor(batch_size_fn=lambda batch: batch.size(0), window_size=2)
    trainer = lightning_mp.Trainer(precision=precision, max_steps=4, callbacks=[monitor],
                                   logger=CSVLogger(tmp_path), log_every_n_steps=1,
                                   enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(Counted())
    assert monitor.available_flops == int(peak)
    logged = trainer.logged_metrics
    assert float(logged["train/device/mfu"]) == pytest.approx(float(logged["train/device/flops_per_sec"]) / peak,
                                                              rel=1e-6)


@pytest.mark.parametrize(("precision", "peak"), PEAKS)
def test_fabric_monitor_as_litgpt_builds_it(precision, peak, h100):
    fabric = lightning_mp.Fabric(accelerator="cpu", devices=1, precision=precision)
    monitor = fabric_throughput.ThroughputMonitor(fabric, window_size=2)
    assert monitor.available_flops == int(peak)
    for step in range(3):
        monitor.update(time=float(step), batches=step, samples=step * 4, flops=10**12)
    assert monitor.compute()["device/mfu"] == pytest.approx(10**12 / peak)


@pytest.mark.parametrize("plugin", [FSDPMasterWeightPrecision("16-master"), FSDP2MasterWeightPrecision("16-master"),
                                    FabricFSDP2MasterWeightPrecision("16-master")], ids=type)
def test_sharded_plugins_answer_their_16bit_dtype(plugin, h100):
    lookup = fabric_throughput if isinstance(plugin, FabricFSDP2MasterWeightPrecision) else trainer_throughput
    assert lookup._plugin_to_compute_dtype(plugin) is torch.float16
    assert lookup._plugin_to_compute_dtype(L.pytorch.plugins.precision.Precision()) is torch.float32
