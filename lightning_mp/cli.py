"""``lightning-mp-train``: run a Hydra recipe with command-line overrides.

    lightning-mp-train recipe=<name> precision=<name> trainer.max_steps=200 model.n_experts=8
    lightning-mp-train recipe=mantissa-trap init_from=outputs/tiny/<time> --multirun

Each run writes to its own directory: the resolved ``config.yaml``, ``metrics.csv``,
``checkpoints/last.ckpt`` and the best checkpoint, and ``summary.json``.
"""

from __future__ import annotations

import inspect
import json
import os
import pickle
import resource
import sys
import time
from collections.abc import Sequence
from importlib import resources
from pathlib import Path
from typing import Any, Optional

import hydra
import lightning.pytorch as L
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.errors import InstantiationException
from hydra.utils import get_object, instantiate
from lightning.fabric.utilities.rank_zero import rank_zero_only
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from lightning_mp.diagnostics import CATEGORIES, bytes_per_param, estimate_memory, memory_audit


class UsageError(Exception):
    """A mistake in the run's configuration: reported in one line, exit status 2."""


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


class PlainProgress(L.Callback):
    """One log line every ``every_n_steps`` steps, for output that is not a terminal (CI, nohup, SLURM)."""

    def __init__(self, every_n_steps: int) -> None:
        self.every_n_steps = max(every_n_steps, 1)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        step = trainer.global_step
        if step % self.every_n_steps == 0 or step == trainer.max_steps:
            shown = {k: v for k, v in trainer.callback_metrics.items() if k.startswith(("train/", "val/", "precision/"))}
            text = "  ".join(f"{k}={v.item():.4g}" for k, v in sorted(shown.items()))
            print(f"step {step}/{trainer.max_steps}  {text}", flush=True)


def fp16_supported(device_type: str) -> bool:
    """Whether an fp16 matmul runs under autocast on this device type."""
    try:
        x = torch.ones(8, 8, device=device_type)
        with torch.autocast(device_type, dtype=torch.float16):
            return (x @ x).dtype == torch.float16
    except (RuntimeError, AssertionError):
        return False


def _device_type(accelerator: str) -> str:
    if accelerator in ("gpu", "cuda") or (accelerator == "auto" and torch.cuda.is_available()):
        return "cuda"
    return "cpu" if accelerator in ("cpu", "auto") else accelerator


LAST_CHECKPOINT = Path("checkpoints", "last.ckpt")  # in a run directory (conf/callbacks/default.yaml)


def _checkpoint(cfg: DictConfig) -> Optional[str]:
    if cfg.ckpt_path and cfg.resume:
        raise UsageError("give either ckpt_path=<file> or resume=<run dir>, not both")
    if cfg.get("init_from") and (cfg.ckpt_path or cfg.resume):
        raise UsageError(
            "init_from starts a new run from a checkpoint's weights, resume and ckpt_path continue the "
            "checkpoint's run (optimizer, schedule and step too): give one of them"
        )
    if cfg.resume:
        path = Path(cfg.resume) / LAST_CHECKPOINT
        if not path.is_file():
            raise UsageError(f"resume={cfg.resume}: no {LAST_CHECKPOINT} in that run directory")
        return str(path)
    if cfg.ckpt_path and not Path(cfg.ckpt_path).is_file():
        raise UsageError(f"ckpt_path={cfg.ckpt_path}: no such file")
    return cfg.ckpt_path


def _check_required(cfg: DictConfig) -> None:
    """A recipe's ``required:`` keys (key: what to give) must be set, on the command line usually."""
    for key, what in (cfg.get("required") or {}).items():
        if OmegaConf.select(cfg, str(key)) in (None, ""):
            raise UsageError(f"recipe={cfg.recipe} needs {key}=<{what}>")


def _init_from(cfg: DictConfig) -> Optional[Path]:
    """The checkpoint file ``init_from`` names: a ``.ckpt`` file, or a run directory's :data:`LAST_CHECKPOINT`."""
    if not cfg.get("init_from"):
        return None
    path = Path(cfg.init_from).expanduser()
    if path.is_dir():
        path = path / LAST_CHECKPOINT
    if not path.is_file():
        raise UsageError(f"init_from={cfg.init_from}: no such checkpoint file (a run directory needs {LAST_CHECKPOINT})")
    return path


def _load_weights(model: L.LightningModule, path: Path) -> None:
    """Set ``model``'s weights from the Lightning checkpoint at ``path``, nothing else of its run.

    Fine-tuning: the optimizer, schedule and step counter start fresh. The model is built in
    FP32 first, so FP32 checkpoints (every ``*-master`` run saves its masters) load exactly and
    the precision plugin casts them afterwards.
    """
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)["state_dict"]
    except (pickle.UnpicklingError, RuntimeError, KeyError, EOFError) as err:
        raise UsageError(f"init_from={path}: not a Lightning checkpoint ({_first_line(err)})") from err
    model.configure_model()
    own = model.state_dict()
    problems = [f"missing {k}" for k in own.keys() - state.keys()]
    problems += [f"unexpected {k}" for k in state.keys() - own.keys()]
    problems += [
        f"{k} is {tuple(state[k].shape)}, the model's {tuple(own[k].shape)}"
        for k in own.keys() & state.keys()
        if own[k].shape != state[k].shape
    ]
    if problems:
        shown = "; ".join(sorted(problems)[:3]) + (f"; and {len(problems) - 3} more" if len(problems) > 3 else "")
        raise UsageError(f"init_from={path}: its weights do not fit this model ({shown}): use the model options it was trained with")
    model.load_state_dict(state)


def _strategy_kind(strategy: Any) -> Optional[str]:
    """``"fsdp"`` when the trainer config asks for FSDP (by name or FSDPStrategy), else None."""
    target = strategy.get("_target_", "") if isinstance(strategy, DictConfig) else str(strategy or "")
    return "fsdp" if "fsdp" in target.lower() else None


def build(cfg: DictConfig) -> tuple[L.LightningModule, L.LightningDataModule, L.Trainer]:
    """The model, data and trainer a config describes; user mistakes become :class:`UsageError`."""
    if "precision" in cfg.trainer:
        raise UsageError(
            f"remove trainer.precision={cfg.trainer.precision}: choose the precision with "
            f"precision=<name> (Lightning refuses a trainer.precision beside a plugin)"
        )
    _check_required(cfg)
    init_from = _init_from(cfg)
    name = cfg.precision.name
    device = _device_type(cfg.trainer.accelerator)
    if name == "16-master" and not fp16_supported(device):
        raise UsageError(f"precision=16-master needs fp16 support, which {device} lacks: use precision=bf16-master")
    if cfg.model.get("max_seq_len", cfg.data.seq_len) < cfg.data.seq_len:
        raise UsageError(f"data.seq_len={cfg.data.seq_len} is longer than model.max_seq_len={cfg.model.max_seq_len}")
    check_types("model", cfg.model, cfg.model.get("_target_"))
    check_types("optimizer", cfg.optimizer, cfg.model.get("_target_"))  # optimizer keys go to the model
    check_types("data", cfg.data, cfg.data.get("_target_"))
    if name in ("bf16-master", "16-master"):
        check_types("precision", cfg.precision, "lightning_mp.MasterWeightPrecision")
    try:
        plugin = instantiate(cfg.precision, device=device, strategy=_strategy_kind(cfg.trainer.get("strategy")))
        # Plain containers, so checkpoints' hyper-parameters load with torch.load(weights_only=True).
        model = instantiate(cfg.model, **OmegaConf.to_container(cfg.optimizer, resolve=True), _convert_="all")
        datamodule = instantiate(cfg.data, _convert_="all")
        loggers = [lg for lg in (instantiate(c) for c in cfg.logger.values()) if lg is not None] if cfg.logger else []
        callbacks = [instantiate(c) for c in cfg.callbacks.values()] if cfg.callbacks else []
    except (InstantiationException, OmegaConfBaseException, TypeError, ValueError) as err:
        raise UsageError(_first_line(err)) from err
    if init_from is not None:
        _load_weights(model, init_from)
    interactive = sys.stdout.isatty()
    if not interactive:
        callbacks.append(PlainProgress(cfg.trainer.log_every_n_steps))
    try:
        trainer = instantiate(
            cfg.trainer,
            plugins=[plugin],
            logger=loggers or False,
            callbacks=callbacks,
            enable_checkpointing=bool(cfg.callbacks) and "checkpoint" in cfg.callbacks,
            enable_progress_bar=interactive,
            default_root_dir=output_dir(),
        )
    except (InstantiationException, TypeError, ValueError) as err:
        raise UsageError(f"trainer: {_first_line(err)}") from err
    return model, datamodule, trainer


def check_types(group: str, node: DictConfig, target: Optional[str]) -> None:
    """Compare each value with the type of ``target``'s default for that argument (``model.d_model=abc``)."""
    if target is None:
        return
    try:
        params = inspect.signature(get_object(target)).parameters
    except (ImportError, AttributeError, ValueError, TypeError) as err:
        raise UsageError(f"{group}._target_={target}: {_first_line(err)}") from err
    for key, value in node.items():
        param = params.get(str(key))
        if param is None or param.default is inspect.Parameter.empty or param.default is None or value is None:
            continue
        expected = type(param.default)
        ok = isinstance(value, expected) and not (expected is int and isinstance(value, bool))
        if expected is float:
            ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        if expected in (int, float, bool, str) and not ok:
            raise UsageError(f"{group}.{key}={value!r} must be {expected.__name__} (default {param.default!r})")


def _first_line(err: BaseException) -> str:
    # Hydra wraps the real error: show its innermost message, which names the bad value.
    while err.__cause__ is not None:
        err = err.__cause__
    return f"{type(err).__name__}: {str(err).strip().splitlines()[0] if str(err).strip() else err!r}"


def train(cfg: DictConfig) -> dict[str, Any]:
    """Train as ``cfg`` says and return (and write) the run's summary."""
    run_dir = Path(output_dir())
    run_dir.mkdir(parents=True, exist_ok=True)
    lead = rank_zero_only.rank == 0  # under DDP/FSDP every process runs this; one writes the files
    if lead:
        (run_dir / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    ckpt, init_from = _checkpoint(cfg), _init_from(cfg)
    model, datamodule, trainer = build(cfg)
    first_step = _FirstStep()
    trainer.callbacks.append(first_step)
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    trainer.fit(model, datamodule, ckpt_path=ckpt)
    elapsed = time.perf_counter() - start
    metrics = {k: v.item() for k, v in trainer.callback_metrics.items() if v.numel() == 1}
    tokens = (trainer.global_step - first_step.step) * cfg.data.batch_size * cfg.data.seq_len
    tokens *= cfg.trainer.accumulate_grad_batches * trainer.world_size
    summary = {
        "precision": cfg.precision.name,
        "master": cfg.precision.get("master"),
        "seed": cfg.seed,
        "recipe": cfg.recipe,
        "init_from": str(init_from) if init_from else None,
        "steps": trainer.global_step,
        "train_loss": metrics.get("train/loss"),
        "val_loss": metrics.get("val/loss"),
        "val_bits_per_byte": metrics.get("val/bits_per_byte"),
        "skipped_steps": metrics.get("precision/skipped_steps", 0.0),
        "tokens_per_sec": tokens / elapsed if elapsed > 0 else None,
        "fit_seconds": elapsed,
        "peak_memory_bytes": _peak_memory(),
        "peak_memory_kind": "cuda max_memory_allocated" if torch.cuda.is_available() else "process peak RSS",
        "n_params": sum(p.numel() for p in model.parameters()),
        "bytes_per_param": bytes_per_param(memory_audit(model, trainer.optimizers, trainer.precision_plugin))["total"],
    }
    if lead:
        (run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
        print(f"run directory: {run_dir}\n{json.dumps(summary, indent=2)}", flush=True)
    return summary


class _FirstStep(L.Callback):
    """The global step training starts from (after any resume), for the run's own token count."""

    step = 0

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.step = trainer.global_step


def _peak_memory() -> int:
    if torch.cuda.is_available():
        return int(torch.cuda.max_memory_allocated())
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


DEFAULT_RECIPE = "tiny"


def recipe_dir() -> Path:
    """The installed ``recipes/`` folder (inside the package in a wheel, the repository's in an editable install)."""
    return Path(str(resources.files("lightning_mp.recipe")))


def recipes() -> list[str]:
    """The installed recipe names (``recipes/*.yaml``)."""
    return sorted(p.stem for p in recipe_dir().glob("*.yaml"))


def compose_recipe(name: str, overrides: Sequence[str] = ()) -> DictConfig:
    """A recipe's config with overrides, without running it (Hydra's compose API)."""
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(str(recipe_dir()), version_base="1.3"):
        return compose(name, overrides=[*overrides, "hydra.searchpath=[pkg://lightning_mp.conf]"])


def hydra_argv(argv: list[str]) -> list[str]:
    """Turn ``recipe=<name>`` into Hydra's ``--config-name`` (a recipe is a primary config extending ``train``)."""
    names = recipes()
    recipe, rest = DEFAULT_RECIPE, []
    for arg in argv:
        if arg.lstrip("+").startswith("recipe="):
            recipe = arg.split("=", 1)[1]
        else:
            rest.append(arg)
    if recipe not in names:
        raise UsageError(f"unknown recipe {recipe!r}; choose one of: {', '.join(names)}")
    return [f"--config-dir={recipe_dir()}", f"--config-name={recipe}", *rest]


@hydra.main(version_base="1.3", config_path="pkg://lightning_mp.conf", config_name="train")
def _hydra_main(cfg: DictConfig) -> None:
    try:
        train(cfg)
    except UsageError as err:
        _fail(err)


def _fail(err: UsageError) -> None:
    print(f"lightning-mp-train: error: {err}", file=sys.stderr)
    sys.exit(2)


def main() -> None:
    """Console entry point (``lightning-mp-train``, ``python -m lightning_mp``)."""
    try:
        sys.argv[1:] = hydra_argv(sys.argv[1:])
    except UsageError as err:
        _fail(err)
    _hydra_main()


# -- lightning-mp-memory and lightning-mp-report ------------------------------------------------

MEMORY_MODES = ("32-true", "bf16-mixed", "bf16-true", "bf16-master", "16-master")


class _AuditAfterStep(L.Callback):
    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        self.audit = memory_audit(pl_module, trainer.optimizers, trainer.precision_plugin)


def measure_memory(model_name: str, precision: str, seq_len: int = 16, batch_size: int = 2) -> dict[str, int]:
    """Bytes per category after one real AdamW step of a ``conf/model`` model under ``precision``."""
    from lightning_mp.precision import precision_plugin

    torch.manual_seed(0)
    model = instantiate(compose_recipe(DEFAULT_RECIPE, [f"model={model_name}"]).model, _convert_="all")
    tokens = torch.randint(0, model.hparams.vocab_size, (batch_size, seq_len + 1))
    data = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(tokens[:, :-1], tokens[:, 1:]), batch_size=batch_size)
    audit = _AuditAfterStep()
    L.Trainer(
        max_steps=1, devices=1, plugins=[precision_plugin(precision)], callbacks=[audit], logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
    ).fit(model, data)
    return audit.audit


def memory_main(argv: Optional[list[str]] = None) -> None:
    """``lightning-mp-memory``: training-state bytes per parameter, measured from live tensors after a step."""
    import argparse

    parser = argparse.ArgumentParser(prog="lightning-mp-memory", description=memory_main.__doc__)
    parser.add_argument("--model", default="tiny", help="a conf/model option (default tiny)")
    parser.add_argument("--precision", nargs="+", default=list(MEMORY_MODES), help="precision names (default: all)")
    args = parser.parse_args(argv)
    print(f"model={args.model}, AdamW, one training step; bytes per parameter (measured / estimated total)\n")
    print("| precision | " + " | ".join(CATEGORIES) + " | total | estimate | total bytes |")
    print("|---|" + "---|" * (len(CATEGORIES) + 3))
    for name in args.precision:
        audit = measure_memory(args.model, name)
        per = bytes_per_param(audit)
        estimate = bytes_per_param(estimate_memory(audit["n_params"], name, "adamw"))["total"]
        cells = " | ".join(f"{per[c]:.2f}" for c in CATEGORIES)
        print(f"| `{name}` | {cells} | **{per['total']:.2f}** | {estimate:.2f} | {audit['total']:,} |")


def report_main(argv: Optional[list[str]] = None) -> None:
    """``lightning-mp-report <sweep dir>``: loss and swallowed-update curves (PNG) and a Markdown table."""
    import argparse

    from lightning_mp.report import write_report

    parser = argparse.ArgumentParser(prog="lightning-mp-report", description=report_main.__doc__)
    parser.add_argument("sweep_dir", type=Path, help="a --multirun directory (one run directory per job)")
    args = parser.parse_args(argv)
    try:
        png, md = write_report(args.sweep_dir)
    except FileNotFoundError as err:
        print(f"lightning-mp-report: error: {err}", file=sys.stderr)
        sys.exit(2)
    print(md.read_text())
    print(f"wrote {png} and {md}")
