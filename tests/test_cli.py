"""lightning-mp-train: every recipe and group option composes and builds; the installed command runs."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch
from hydra.utils import instantiate
from lightning.pytorch.plugins.precision import Precision

from lightning_mp import MoEModule
from lightning_mp.cli import UsageError, build, compose_recipe, hydra_argv, recipes
from lightning_mp.data import ByteTextDataModule

REPO = Path(__file__).resolve().parent.parent
GROUPS = {g: sorted(p.stem for p in (REPO / "conf" / g).glob("*.yaml"))
          for g in ("precision", "model", "data", "optimizer", "trainer", "logger", "callbacks")}
FAST = ["trainer.max_steps=3", "trainer.val_check_interval=3", "trainer.limit_val_batches=2", "data.max_bytes=200000"]


def test_groups_and_recipes_are_complete():
    assert GROUPS["precision"] == sorted(["32-true", "bf16-mixed", "16-mixed", "bf16-true", "bf16-master", "16-master"])
    assert recipes() == ["fp16", "gpu-100m", "mantissa-trap", "tiny"]
    for recipe in recipes():
        header = (REPO / "recipes" / f"{recipe}.yaml").read_text()
        assert f"lightning-mp-train recipe={recipe}" in header  # its run command is in its header


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    """A run directory holding checkpoints/last.ckpt of the tiny model after 3 bf16-master steps."""
    run = tmp_path_factory.mktemp("run")
    cfg = compose_recipe("tiny", [*FAST, "trainer.accelerator=cpu", "logger=none", "~callbacks.lr_monitor",
                                  f"callbacks.checkpoint.dirpath={run}/checkpoints"])
    model, data, trainer = build(cfg)
    trainer.fit(model, data)
    return run


@pytest.mark.parametrize("recipe", ["fp16", "gpu-100m", "mantissa-trap", "tiny"])
def test_every_recipe_builds(recipe, trained_run, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    fine_tune = [f"init_from={trained_run}"] if recipe == "mantissa-trap" else []  # it fine-tunes a trained model
    cfg = compose_recipe(recipe, ["trainer.accelerator=cpu", *fine_tune])
    assert cfg.recipe == recipe
    model, data, trainer = build(cfg)
    assert isinstance(model, MoEModule) and isinstance(data, ByteTextDataModule)
    assert trainer.precision_plugin.precision == cfg.precision.name


@pytest.mark.parametrize("group, option", [(g, o) for g, options in GROUPS.items() for o in options])
def test_every_group_option_builds(group, option, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    overrides = [f"{group}={option}", "trainer.accelerator=cpu"]
    if (group, option) == ("data", "text"):
        (tmp_path / "t.txt").write_text("some text to learn from\n" * 100)
        overrides.append(f"data.path={tmp_path / 't.txt'}")
    cfg = compose_recipe("tiny", overrides)
    if (group, option) == ("trainer", "fsdp"):  # on any machine: the accelerator is forced to the CPU above
        with pytest.raises(UsageError, match="fsdp` requires a GPU"):  # Lightning's FSDP needs CUDA
            build(cfg)
        return
    if (group, option) == ("logger", "tensorboard") and not _tensorboard_installed():
        with pytest.raises(UsageError, match="tensorboard"):
            build(cfg)
        return
    model, data, trainer = build(cfg)
    assert isinstance(trainer.precision_plugin, Precision)
    if (group, option) == ("logger", "default"):
        kinds = {type(lg).__name__ for lg in trainer.loggers}
        assert "CSVLogger" in kinds and (("TensorBoardLogger" in kinds) == _tensorboard_installed())
    if group == "model":
        assert model.hparams.d_model == cfg.model.d_model
    if group == "optimizer":
        assert model.hparams.lr == cfg.optimizer.lr


def test_trainer_fsdp_wraps_blocks_and_selects_the_fsdp_master_plugin():
    from lightning.pytorch.strategies import FSDPStrategy
    from torch.distributed.fsdp.wrap import ModuleWrapPolicy

    from lightning_mp.cli import strategy_kind
    from lightning_mp.model import Block
    from lightning_mp.precision import FSDPMasterWeightPrecision

    cfg = compose_recipe("tiny", ["trainer=fsdp"])
    strategy = instantiate(cfg.trainer.strategy)
    policy = strategy.kwargs["auto_wrap_policy"]
    assert isinstance(strategy, FSDPStrategy) and isinstance(policy, ModuleWrapPolicy)
    assert policy._module_classes == {Block}
    plugin = instantiate(cfg.precision, strategy=strategy_kind(cfg.trainer.strategy))
    assert isinstance(plugin, FSDPMasterWeightPrecision)
    config = plugin.mixed_precision_config
    assert (config.param_dtype, config.reduce_dtype, config.buffer_dtype) == (torch.bfloat16, torch.float32, None)
    assert strategy_kind(compose_recipe("tiny", ["trainer=ddp"]).trainer.strategy) is None


def _tensorboard_installed() -> bool:
    return any(importlib.util.find_spec(m) is not None for m in ("tensorboard", "tensorboardX"))


def test_clear_errors_for_bad_input(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(UsageError, match="unknown recipe 'nope'; choose one of: fp16, gpu-100m, mantissa-trap, tiny"):
        hydra_argv(["recipe=nope"])
    assert hydra_argv(["trainer.max_steps=3"])[1:] == ["--config-name=tiny", "trainer.max_steps=3"]
    with pytest.raises(UsageError, match=r"model.d_model=abc must be an integer"):
        build(compose_recipe("tiny", ["model.d_model=abc"]))
    with pytest.raises(UsageError, match=r"remove trainer.precision=bf16-mixed.*precision=<name>"):
        build(compose_recipe("tiny", ["+trainer.precision=bf16-mixed"]))
    with pytest.raises(UsageError, match="data.seq_len=128 is longer than model.max_seq_len=64"):
        build(compose_recipe("tiny", ["data.seq_len=128"]))
    monkeypatch.setattr("lightning_mp.cli.components.fp16_supported", lambda device: False)
    with pytest.raises(UsageError, match="16-master needs fp16 support.*precision=bf16-master"):
        build(compose_recipe("fp16", ["trainer.accelerator=cpu"]))


def test_init_from_fine_tunes_the_weights_of_a_trained_run(trained_run, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    saved = torch.load(trained_run / "checkpoints" / "last.ckpt", weights_only=True)
    assert saved["global_step"] == 3
    cfg = compose_recipe("mantissa-trap", [*FAST, "trainer.max_steps=2", "trainer.val_check_interval=2",
                                           "trainer.accelerator=cpu", f"init_from={trained_run}", "logger=none",
                                           "~callbacks.checkpoint", "~callbacks.lr_monitor"])
    model, data, trainer = build(cfg)
    own = model.state_dict()
    assert own.keys() == saved["state_dict"].keys()
    assert all(torch.equal(own[k], v) for k, v in saved["state_dict"].items())  # loaded exactly ...
    head = own["model.head.weight"]
    assert not torch.equal(head, head.bfloat16().float())  # ... from the FP32 masters, not their bf16 copies
    trainer.fit(model, data)
    assert data.train_files == ["topics.py"]  # the recipe's fine-tuning text
    # A new run: the step counter and Adam's state start over (a resume would start at step 3 and stop).
    assert trainer.global_step == 2
    assert {int(state["step"]) for state in trainer.optimizers[0].state.values()} == {2}


@pytest.mark.parametrize("precision", ["bf16-true", "bf16-master"])
def test_mantissa_trap_recipe_lr_is_below_half_a_bf16_step(precision, trained_run, tmp_path, monkeypatch):
    """The recipe's premise: at its lr nearly every update is under half a bf16 step of its weight."""
    monkeypatch.chdir(tmp_path)
    cfg = compose_recipe("mantissa-trap", [
        f"precision={precision}", "trainer.accelerator=cpu", f"init_from={trained_run}", "logger=none",
        "~callbacks.checkpoint", "~callbacks.lr_monitor", "trainer.max_steps=20", "trainer.limit_val_batches=0",
        "callbacks.swallowed.every_n_steps=20",
    ])
    model, data, trainer = build(cfg)
    trainer.fit(model, data)
    metrics = trainer.callback_metrics
    assert metrics["precision/update_to_half_step"] < 0.5
    if precision == "bf16-true":
        assert metrics["precision/swallowed_frac"] > 0.8  # lost: the weights barely move
    else:
        assert metrics["precision/swallowed_frac"] < 1e-3  # the updates land in the FP32 masters ...
        assert metrics["precision/swallowed_without_masters"] > 0.8  # ... that bf16 weights alone would lose


def test_the_console_line_replaces_lightnings_bars_rich_installed_or_not(tmp_path, monkeypatch):
    from lightning_mp.cli.console import Progress

    monkeypatch.chdir(tmp_path)
    for terminal in (True, False):
        _, _, trainer = build(compose_recipe("tiny"), terminal)
        assert isinstance(trainer.progress_bar_callback, Progress) and trainer.progress_bar_callback.terminal is terminal


def test_a_recipes_callback_settings_under_callbacks_none(trained_run, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    _, _, trainer = build(compose_recipe("mantissa-trap", [f"init_from={trained_run}", "callbacks=none", "logger=none"]))
    assert not [c for c in trainer.callbacks if type(c).__module__.startswith("lightning_mp.diagnostics")]
    assert trainer.checkpoint_callback is None and not trainer.loggers


def test_init_from_errors_are_clear(trained_run, tmp_path, monkeypatch):
    from lightning_mp.cli import checkpoint_path

    monkeypatch.chdir(tmp_path)
    with pytest.raises(UsageError, match="recipe=mantissa-trap needs init_from=<the run directory or .ckpt file of"):
        build(compose_recipe("mantissa-trap"))
    with pytest.raises(UsageError, match="no such checkpoint file"):
        build(compose_recipe("tiny", [f"init_from={tmp_path}"]))
    with pytest.raises(UsageError, match=r"do not fit this model \(model.blocks.0.*is \(64,\), the model's \(32,\)"):
        build(compose_recipe("tiny", [f"init_from={trained_run}", "model.d_model=32"]))
    (tmp_path / "notes.ckpt").write_text("not a checkpoint")
    with pytest.raises(UsageError, match="not a Lightning checkpoint"):
        build(compose_recipe("tiny", [f"init_from={tmp_path / 'notes.ckpt'}"]))
    with pytest.raises(UsageError, match="init_from starts a new run.*give one of them"):
        checkpoint_path(compose_recipe("tiny", [f"init_from={trained_run}", f"resume={trained_run}"]))


def test_distributed_checkpoints_resume_and_initialize_runs(trained_run, tmp_path, monkeypatch):
    """A distributed (DCP) checkpoint, the directory ``trainer=fsdp2`` writes with
    ``trainer.strategy.save_distributed_checkpoint=true``: laid out here as Lightning's
    ModelParallelStrategy lays it out (tensors through torch.distributed.checkpoint, the rest in
    meta.pt), from the trained run's file checkpoint."""
    import torch.distributed.checkpoint as dcp

    from lightning_mp.cli import checkpoint_path
    from lightning_mp.cli.checkpoints import check_resume

    monkeypatch.chdir(tmp_path)
    saved = torch.load(trained_run / "checkpoints" / "last.ckpt", weights_only=True)
    run = tmp_path / "sharded_run"
    last = run / "checkpoints" / "last.ckpt"
    dcp.save({"state_dict": saved.pop("state_dict")}, checkpoint_id=str(last))
    torch.save(saved, last / "meta.pt")
    # resume: found, read (its step from meta.pt, its weights' names and shapes from the shards' metadata)
    cfg = compose_recipe("tiny", [f"resume={run}", "trainer.max_steps=5"])
    assert checkpoint_path(cfg) == str(last.resolve())
    model, _, _ = build(cfg)
    check_resume(model, str(last), cfg)
    with pytest.raises(UsageError, match="already trained 3 steps"):
        check_resume(model, str(last), compose_recipe("tiny", [f"resume={run}", "trainer.max_steps=3"]))
    narrow, _, _ = build(compose_recipe("tiny", [f"resume={run}", "trainer.max_steps=5", "model.d_model=32"]))
    with pytest.raises(UsageError, match=r"do not fit this model \(model.blocks.0.*is \(64,\), the model's \(32,\)"):
        check_resume(narrow, str(last), cfg)
    # init_from: the weights read whole into one process, exactly
    model, _, _ = build(compose_recipe("tiny", [f"init_from={last}"]))
    own = model.state_dict()
    reference = torch.load(trained_run / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
    assert own.keys() == reference.keys() and all(torch.equal(own[k], v) for k, v in reference.items())


def _command() -> list[str]:
    exe = shutil.which("lightning-mp-train", path=str(Path(sys.executable).parent))
    assert exe, "the console script is not installed"
    return [exe]


def _run(args, cwd, env=None):
    return subprocess.run(_command() + args, cwd=cwd, capture_output=True, text=True, timeout=300, env=env)


@pytest.mark.slow
def test_installed_command_runs_and_resumes_from_an_unrelated_directory(tmp_path):
    result = _run(FAST, tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    (run,) = (p for p in (tmp_path / "outputs" / "tiny").iterdir() if not p.is_symlink())
    assert (tmp_path / "outputs" / "tiny" / "latest").resolve() == run.resolve()
    assert result.stdout.splitlines()[0].endswith(str(run.relative_to(tmp_path)))  # the run directory comes first
    for name in ("config.yaml", "metrics.csv", "summary.json", "checkpoints/last.ckpt"):
        assert (run / name).is_file(), name
    assert list((run / "checkpoints").glob("best-*.ckpt"))
    summary = json.loads((run / "summary.json").read_text())
    assert summary["precision"] == "bf16-master" and summary["steps"] == 3 and summary["recipe"] == "tiny"
    assert summary["val_loss"] > 0 and summary["tokens_per_sec"] > 0 and summary["peak_memory_bytes"] > 0
    assert "step 3/3" in result.stdout  # plain log lines when stdout is not a terminal
    resumed = _run([*FAST, "trainer.max_steps=5", "resume=outputs/tiny/latest"], tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    latest = (tmp_path / "outputs" / "tiny" / "latest").resolve()
    assert latest != run.resolve()
    resumed_summary = json.loads((latest / "summary.json").read_text())
    assert resumed_summary["steps"] == 5
    # throughput counts this run's own steps (3 -> 5) of 16 x 64 tokens, not the resumed ones
    assert resumed_summary["tokens_per_sec"] * resumed_summary["fit_seconds"] == pytest.approx(2 * 16 * 64)


def test_the_installed_command_reports_bad_input_in_one_line(tmp_path):
    """Through the console script, as a shell runs it (every other case in-process: test_cli_checks.py)."""
    result = _run(["precision=fp8"], tmp_path)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr == ("lightning-mp-train: error: precision=fp8: no such option; choose one of: 16-master, "
                             "16-mixed, 32-true, bf16-master, bf16-mixed, bf16-true\n")


@pytest.mark.slow
def test_multirun_over_two_precisions_writes_two_run_directories(tmp_path):
    result = _run(["--multirun", "precision=32-true,bf16-master", *FAST, "callbacks.swallowed.every_n_steps=1",
                   "~callbacks.checkpoint"], tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    (sweep,) = (p for p in (tmp_path / "multirun" / "tiny").iterdir() if not p.is_symlink())
    runs = sorted(p.name for p in sweep.iterdir() if p.is_dir() and (p / "summary.json").exists())
    assert runs == ["0_32-true_seed0", "1_bf16-master_seed0"]
    assert json.loads((sweep / "1_bf16-master_seed0" / "summary.json").read_text())["precision"] == "bf16-master"
    report = subprocess.run([str(Path(_command()[0]).parent / "lightning-mp-report"), str(sweep)],
                            capture_output=True, text=True, timeout=120)
    assert report.returncode == 0, report.stderr[-2000:]
    assert (sweep / "report.png").stat().st_size > 10_000 and "| `bf16-master` |" in (sweep / "report.md").read_text()


@pytest.mark.slow
def test_wheel_ships_every_yaml_and_runs_from_the_wheel(tmp_path):
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(tmp_path), str(REPO)],
                   check=True, capture_output=True, timeout=600)
    (wheel,) = tmp_path.glob("lightning_mp-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    expected = {f"lightning_mp/conf/{p.relative_to(REPO / 'conf').as_posix()}" for p in (REPO / "conf").rglob("*.yaml")}
    expected |= {f"lightning_mp/recipe/{p.name}" for p in (REPO / "recipes").glob("*.yaml")}
    assert expected and expected <= names
    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(target), str(wheel)],
                   check=True, capture_output=True, timeout=600)
    env = {**os.environ, "PYTHONPATH": str(target)}
    where = subprocess.run([sys.executable, "-c", "import lightning_mp.cli as c; print(c.__file__, c.recipe_dir())"],
                           cwd=tmp_path, env=env, capture_output=True, text=True, check=True).stdout
    assert str(target) in where and str(REPO) not in where  # the wheel's copy, not the checkout
    result = subprocess.run([sys.executable, "-m", "lightning_mp", *FAST, "trainer.max_steps=1", "callbacks=none"],
                            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert list((tmp_path / "outputs" / "tiny").glob("*/summary.json"))
