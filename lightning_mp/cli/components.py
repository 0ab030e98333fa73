"""From a composed config to the model, data and Trainer of a run; user mistakes become :class:`UsageError`."""

from __future__ import annotations

import os
import sys
from typing import Any, Optional

import lightning.pytorch as L
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from lightning.fabric.plugins import TorchCheckpointIO
from lightning.pytorch.callbacks import LearningRateMonitor, ModelCheckpoint
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from lightning_mp.cli.checkpoints import check_fits, init_from_path, load_weights, read_checkpoint
from lightning_mp.cli.checks import UsageError, check_data, first_line, validate
from lightning_mp.cli.console import Progress
from lightning_mp.precision.factory import fp16_supported


def output_dir() -> str:
    """The run directory: Hydra's output directory, or the working directory outside a Hydra run."""
    try:
        return HydraConfig.get().runtime.output_dir
    except ValueError:
        return os.getcwd()


OmegaConf.register_new_resolver("output_dir", output_dir, replace=True)


def tensorboard_if_installed(save_dir: str, name: str = "tensorboard") -> Optional[L.loggers.Logger]:
    """A TensorBoardLogger when ``tensorboard`` (or ``tensorboardX``) is importable, else ``None``."""
    try:
        return L.loggers.TensorBoardLogger(save_dir=save_dir, name=name, version="")
    except ModuleNotFoundError:
        return None


def device_type(accelerator: str) -> str:
    if accelerator in ("gpu", "cuda") or (accelerator == "auto" and torch.cuda.is_available()):
        return "cuda"
    return "cpu" if accelerator in ("cpu", "auto") else accelerator


def strategy_kind(strategy: Any) -> Optional[str]:
    """``"fsdp"`` when the trainer config asks for FSDP (by name or FSDPStrategy), ``"fsdp2"`` for
    ``ModelParallelStrategy``, else None."""
    target = strategy.get("_target_", "") if isinstance(strategy, DictConfig) else str(strategy or "")
    if "fsdp2" in target.lower() or "modelparallel" in target.lower().replace("_", ""):
        return "fsdp2"
    return "fsdp" if "fsdp" in target.lower() else None


class _LastAtEnd(L.Callback):
    """``last.ckpt`` at the run's last step: ``ModelCheckpoint`` writes it after validations, and the
    steps after the last one would be trained again by a resume."""

    def __init__(self, checkpoint: ModelCheckpoint) -> None:
        self.checkpoint = checkpoint

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.checkpoint.dirpath is not None:
            path = os.path.join(self.checkpoint.dirpath, f"{self.checkpoint.CHECKPOINT_NAME_LAST}{self.checkpoint.FILE_EXTENSION}")
            trainer.save_checkpoint(path)
            # ModelCheckpoint (lightning 2.6) saves last at the end of a run that saved nothing
            # before; told its last is this file, it writes it again rather than a last-v1.ckpt
            self.checkpoint.last_model_path = path


class _SubclassLoad(TorchCheckpointIO):
    """Lightning's loader, but mapping storages with ``"cpu"`` instead of Lightning's callable
    (which keeps every storage on the CPU too): torch cannot rebuild a tensor subclass (torchao's
    8-bit optimizer state) through a callable ``map_location``."""

    def load_checkpoint(self, path: Any, map_location: Optional[Any] = "cpu", weights_only: Optional[bool] = None) -> dict[str, Any]:
        return super().load_checkpoint(path, map_location=map_location, weights_only=weights_only)


def build(cfg: DictConfig, terminal: Optional[bool] = None) -> tuple[L.LightningModule, L.LightningDataModule, L.Trainer]:
    """The model, data and trainer a config describes, each input checked first."""
    if "precision" in cfg.trainer:
        raise UsageError(
            f"remove trainer.precision={cfg.trainer.precision}: choose the precision with "
            f"precision=<name> (Lightning refuses a trainer.precision beside a plugin)"
        )
    validate(cfg)
    init_from = init_from_path(cfg)
    name = cfg.precision.name
    device = device_type(cfg.trainer.accelerator)
    if name in ("16-master", "16-mixed") and not fp16_supported(device):
        other = name.replace("16", "bf16", 1)
        raise UsageError(f"precision={name} needs fp16 support, which {device} lacks: use precision={other}")
    try:
        plugin = instantiate(cfg.precision, device=device, strategy=strategy_kind(cfg.trainer.get("strategy")))
    except (InstantiationException, OmegaConfBaseException, TypeError, ValueError) as err:
        raise UsageError(f"precision: {first_line(err)}") from err
    try:
        # Plain containers, so checkpoints' hyper-parameters load with torch.load(weights_only=True).
        optimizer = OmegaConf.to_container(cfg.optimizer, resolve=True)
        optimizer["optimizer_impl"] = optimizer.pop("impl", "auto")  # the model's name for optimizer.impl
        model = instantiate(cfg.model, **optimizer, _convert_="all")
    except (InstantiationException, OmegaConfBaseException, TypeError, ValueError) as err:
        raise UsageError(f"model: {first_line(err)}") from err
    try:
        datamodule = instantiate(cfg.data, _convert_="all")
    except (InstantiationException, OmegaConfBaseException, TypeError, ValueError) as err:
        raise UsageError(f"data: {first_line(err)}") from err
    check_data(datamodule)
    try:
        # an entry without _target_ tunes one the chosen group lacks (a recipe's settings under callbacks=none)
        loggers = [lg for lg in (instantiate(c) for c in (cfg.logger or {}).values() if "_target_" in c) if lg is not None]
        callbacks = [instantiate(c) for c in (cfg.callbacks or {}).values() if "_target_" in c]
    except (InstantiationException, OmegaConfBaseException, TypeError, ValueError) as err:
        raise UsageError(first_line(err)) from err
    if not loggers:  # logger=none: nothing records the learning rate
        callbacks = [c for c in callbacks if not isinstance(c, LearningRateMonitor)]
    callbacks += [_LastAtEnd(c) for c in callbacks if isinstance(c, ModelCheckpoint) and c.save_last]
    if init_from is not None:
        checkpoint = read_checkpoint(init_from, "init_from", trust=cfg.get("trust_checkpoint", False))
        check_fits(model, checkpoint["state_dict"], init_from, "init_from")
        load_weights(model, init_from, checkpoint)  # FP32 weights, cast by the plugin later
    max_steps = cfg.trainer.max_steps
    every = cfg.trainer.get("log_every_n_steps", 50)
    if max_steps > 0:
        every = min(every, max_steps)  # a short run still logs (metrics.csv) and prints its steps
    callbacks.append(Progress(every, terminal=sys.stdout.isatty() if terminal is None else terminal))
    overrides: dict[str, Any] = dict(log_every_n_steps=every)
    if cfg.trainer.get("check_val_every_n_epoch", "unset") == "unset" and isinstance(cfg.trainer.get("val_check_interval"), int):
        # validation every n training batches of the whole run, not of a pass over the data: Lightning
        # then neither refuses an interval longer than a pass nor shifts it after a resume
        overrides["check_val_every_n_epoch"] = None
    try:
        trainer = instantiate(
            cfg.trainer,
            plugins=[plugin] + ([_SubclassLoad()] if str(cfg.optimizer.get("impl", "auto")).startswith("torchao") else []),
            logger=loggers or False,
            callbacks=callbacks,
            enable_checkpointing=bool(cfg.callbacks) and "checkpoint" in cfg.callbacks,
            enable_progress_bar=True,
            enable_model_summary=False,
            default_root_dir=output_dir(),
            **overrides,
        )
    except (InstantiationException, TypeError, ValueError) as err:
        raise UsageError(f"trainer: {first_line(err)}") from err
    return model, datamodule, trainer
