"""``lightning_mp.Trainer``: Lightning's Trainer that also takes ``precision="bf16-master"``."""

import lightning.pytorch as L
import pytest
import torch
from lightning.pytorch.plugins.precision import MixedPrecision
from lightning.pytorch.strategies import FSDPStrategy

import lightning_mp
from lightning_mp import MasterWeightPrecision
from lightning_mp.precision import FSDPMasterWeightPrecision

from conftest import TinyRegressor, regression_data

QUIET = dict(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
             enable_model_summary=False, max_steps=6)


def _fit(trainer: L.Trainer) -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    model = TinyRegressor(lr=1e-2)
    trainer.fit(model, regression_data())
    return {k: v.clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("precision", ["bf16-master", "16-master"])
def test_precision_name_trains_as_the_plugin(precision):
    ours = lightning_mp.Trainer(precision=precision, **QUIET)
    assert isinstance(ours.precision_plugin, MasterWeightPrecision)
    assert ours.precision_plugin.precision == precision
    plugin = L.Trainer(plugins=[MasterWeightPrecision(precision)], **QUIET)
    got, expected = _fit(ours), _fit(plugin)
    assert got.keys() == expected.keys()
    for key in got:
        assert got[key].dtype == torch.float32  # FP32 values in the state dict
        assert torch.equal(got[key], expected[key]), key
    assert not torch.equal(got["out.weight"], TinyRegressor().state_dict()["out.weight"])


def test_lightning_names_and_other_arguments_pass_through():
    trainer = lightning_mp.Trainer(precision="bf16-mixed", max_epochs=3, accelerator="cpu", logger=False)
    assert isinstance(trainer.precision_plugin, MixedPrecision) and trainer.max_epochs == 3
    assert isinstance(lightning_mp.Trainer(accelerator="cpu", logger=False), L.Trainer)


@pytest.mark.parametrize("make", [lightning_mp.Trainer, lightning_mp.Fabric])
@pytest.mark.parametrize("name", ["bf16-masters", "fp8-master", 8])
def test_an_unknown_precision_is_one_line_naming_ours_and_lightnings(make, name):
    with pytest.raises(ValueError) as err:
        make(precision=name, accelerator="cpu")
    message = str(err.value)
    assert message.startswith(f"Precision '{name}' is invalid") and "\n" not in message
    assert all(n in message for n in ("'bf16-master'", "'16-master'", "'bf16-mixed'", "'32-true'", "'16-mixed'"))


def test_a_precision_name_and_a_plugin_together_is_an_error():
    with pytest.raises(ValueError, match="give one of them"):
        lightning_mp.Trainer(precision="bf16-master", plugins=[MasterWeightPrecision("bf16-master")])


@pytest.mark.parametrize("strategy", ["fsdp", FSDPStrategy()])
def test_fsdp_strategy_gets_the_fsdp_plugin(strategy, monkeypatch):
    """What reaches Lightning's Trainer (whose FSDP refuses a CPU): the FSDP plugin, no precision."""
    given = {}
    monkeypatch.setattr(L.Trainer, "__init__", lambda self, *args, **kwargs: given.update(kwargs))
    lightning_mp.Trainer(precision="bf16-master", strategy=strategy)
    (plugin,) = given["plugins"]
    assert isinstance(plugin, FSDPMasterWeightPrecision) and given["precision"] is None
    assert given["strategy"] is strategy


def test_model_parallel_strategy_gets_the_fsdp2_plugin():
    from lightning.pytorch.strategies import ModelParallelStrategy

    from lightning_mp.precision import FSDP2MasterWeightPrecision

    trainer = lightning_mp.Trainer(precision="16-master", strategy=ModelParallelStrategy(), accelerator="cpu",
                                   devices=1, logger=False)
    assert isinstance(trainer.precision_plugin, FSDP2MasterWeightPrecision)
    assert trainer.precision_plugin.precision == "16-master"


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="Lightning's FSDP needs CUDA")
def test_fsdp_strategy_gets_the_fsdp_plugin_on_a_gpu():
    trainer = lightning_mp.Trainer(precision="bf16-master", strategy="fsdp", devices=1, logger=False)
    assert isinstance(trainer.precision_plugin, FSDPMasterWeightPrecision)
