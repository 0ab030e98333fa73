"""Loading a checkpoint never runs code that came with it: every path by which lightning-mp reads one,
against a hostile file whose payload writes a marker file; our own checkpoints load as plain data."""

import os
from pathlib import Path

import pytest
import torch
from conftest import MODE_IDS, MODES, TinyRegressor, mode_plugin, regression_data, run_cli, trainer

import lightning_mp
from lightning_mp import MoEModule, UnsafeCheckpointError, loading

SHORT = ["trainer.max_steps=2", "trainer.limit_val_batches=1", "data.max_bytes=100000", "callbacks.swallowed.every_n_steps=5"]


class Payload:
    """What an attacker pickles: unpickling it calls os.system."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def hostile(good: Path, out: Path, where: str = "callbacks") -> Path:
    """``good``'s checkpoint with a payload hidden in ``where``; returns its marker's path."""
    marker = out.parent / f"{out.stem}.MARKER"
    checkpoint = torch.load(good, weights_only=True)
    if where == "callbacks":
        checkpoint["callbacks"]["EvilCallback"] = {"state": Payload(marker)}
    elif where == "hyper_parameters":
        checkpoint.setdefault("hyper_parameters", {})["lr"] = Payload(marker)
    else:  # inside the weights' own dictionary
        checkpoint["state_dict"]["evil"] = Payload(marker)
    torch.save(checkpoint, out)
    return marker


@pytest.fixture(scope="module")
def cli_run(tmp_path_factory):
    """One default-recipe run of two steps: a real MoEModule checkpoint of the CLI."""
    work = tmp_path_factory.mktemp("cli")
    monkeypatch = pytest.MonkeyPatch()
    monkeypatch.chdir(work)
    capsys = _Quiet()
    code, _, err = run_cli(SHORT, capsys, monkeypatch)
    monkeypatch.undo()
    assert code == 0, err
    return (work / "outputs" / "tiny" / "latest").resolve()


class _Quiet:
    def readouterr(self):
        return "", ""


@pytest.mark.parametrize("where", ["callbacks", "hyper_parameters", "state_dict"])
@pytest.mark.parametrize("option", ["init_from", "ckpt_path", "resume", "dcp"])
def test_the_command_line_refuses_a_hostile_checkpoint_before_it_runs(cli_run, option, where, tmp_path, capsys,
                                                                      monkeypatch):
    monkeypatch.chdir(tmp_path)
    if option == "dcp":  # a distributed checkpoint's meta.pt, read before its shards
        target = tmp_path / "dcp"
        target.mkdir()
        marker = hostile(cli_run / "checkpoints" / "last.ckpt", target / "meta.pt", where)
        arg = f"ckpt_path={target}"
    elif option == "resume":  # a run directory whose last.ckpt was replaced
        (tmp_path / "run" / "checkpoints").mkdir(parents=True)
        marker = hostile(cli_run / "checkpoints" / "last.ckpt", tmp_path / "run" / "checkpoints" / "last.ckpt", where)
        arg = f"resume={tmp_path / 'run'}"
    else:
        marker = hostile(cli_run / "checkpoints" / "last.ckpt", tmp_path / "evil.ckpt", where)
        arg = f"{option}={tmp_path / 'evil.ckpt'}"
    code, out, err = run_cli([arg, "trainer.max_steps=4", *SHORT[1:]], capsys, monkeypatch)
    assert code == 2 and not marker.exists(), (code, err)
    line = err.strip().splitlines()[-1]
    assert len(err.strip().splitlines()) == 1 and "lightning-mp-train: error:" in line
    assert "os.system" in line or "posix.system" in line, line  # what it holds that is not plain data
    assert "trust_checkpoint=true" in line  # the opt-in for a file the user trusts
    assert any(f"{name}: holds" in line for name in ("evil.ckpt", "last.ckpt", "meta.pt")), line  # the file


def test_the_same_file_loads_with_the_explicit_opt_in(cli_run, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    marker = hostile(cli_run / "checkpoints" / "last.ckpt", tmp_path / "evil.ckpt")
    code, _, err = run_cli([f"init_from={tmp_path / 'evil.ckpt'}", "trust_checkpoint=true", *SHORT], capsys, monkeypatch)
    assert code == 0, err
    assert marker.exists()  # the user trusted it: it ran, as torch.load(weights_only=False) would


@pytest.fixture
def regressor_checkpoint(tmp_path):
    t = trainer("bf16-master", max_steps=2)
    t.fit(TinyRegressor(), regression_data())
    t.save_checkpoint(tmp_path / "good.ckpt")
    return tmp_path / "good.ckpt"


@pytest.mark.parametrize("method", ["fit", "validate", "test", "predict"])
def test_lightning_mp_trainer_refuses_a_hostile_checkpoint_in_one_line(regressor_checkpoint, method, tmp_path):
    marker = hostile(regressor_checkpoint, tmp_path / "evil.ckpt")
    t = lightning_mp.Trainer(precision="bf16-master", max_steps=3, accelerator="cpu", logger=False,
                             enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    data = regression_data()
    with pytest.raises(UnsafeCheckpointError) as info:
        getattr(t, method)(TinyRegressor(), data, ckpt_path=tmp_path / "evil.ckpt")
    message = str(info.value)
    assert "\n" not in message and "evil.ckpt" in message and "system" in message and "weights_only=False" in message
    assert not marker.exists()


def test_trainer_fit_loads_a_trusted_file_with_weights_only_false(regressor_checkpoint, tmp_path):
    marker = hostile(regressor_checkpoint, tmp_path / "evil.ckpt")
    t = lightning_mp.Trainer(precision="bf16-master", max_steps=3, accelerator="cpu", logger=False,
                             enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    t.fit(TinyRegressor(), regression_data(), ckpt_path=tmp_path / "evil.ckpt", weights_only=False)
    assert marker.exists() and t.global_step == 3


def test_load_from_checkpoint_refuses_a_hostile_checkpoint(cli_run, tmp_path):
    marker = hostile(cli_run / "checkpoints" / "last.ckpt", tmp_path / "evil.ckpt")
    with pytest.raises(UnsafeCheckpointError, match=r"evil\.ckpt: holds a reference to (posix|os)\.system"):
        MoEModule.load_from_checkpoint(tmp_path / "evil.ckpt")
    assert not marker.exists()
    own = MoEModule.load_from_checkpoint(cli_run / "checkpoints" / "last.ckpt")  # our own: no opt-in
    assert own.hparams.n_experts > 0


@pytest.mark.parametrize("mode", MODES, ids=MODE_IDS)
def test_our_own_checkpoints_are_plain_data_in_every_mode(mode, tmp_path):
    from conftest import mode_adamw

    class Model(TinyRegressor):
        def configure_optimizers(self):
            return mode_adamw(mode, self.parameters(), lr=1e-2)

    t = trainer(mode_plugin(mode), max_steps=2)
    t.fit(Model(), regression_data())
    t.save_checkpoint(tmp_path / "own.ckpt")
    checkpoint = loading.load(tmp_path / "own.ckpt")  # weights_only=True, no opt-in
    assert type(t.precision_plugin).__qualname__ in checkpoint
    resumed = trainer(mode_plugin(mode), max_steps=3)
    resumed.fit(Model(), regression_data(), ckpt_path=tmp_path / "own.ckpt")
    assert resumed.global_step == 3


def test_the_message_names_what_is_not_plain_data(tmp_path):
    torch.save({"state_dict": {}, "x": Payload(tmp_path / "m")}, tmp_path / "a.ckpt")
    with pytest.raises(UnsafeCheckpointError, match=r"a\.ckpt: holds a reference to (posix|os)\.system.*trust_checkpoint"):
        loading.load(tmp_path / "a.ckpt", opt_in="trust_checkpoint=true")
    torch.save({"w": torch.ones(2)}, tmp_path / "legacy.ckpt", _use_new_zipfile_serialization=False)
    assert torch.equal(loading.load(tmp_path / "legacy.ckpt")["w"], torch.ones(2))  # the old format is data too
    assert not (tmp_path / "m").exists()


def test_ckpt_path_last_is_checked_once_lightning_resolves_it(regressor_checkpoint, tmp_path):
    from lightning.pytorch.callbacks import ModelCheckpoint

    (tmp_path / "ck").mkdir()
    marker = hostile(regressor_checkpoint, tmp_path / "ck" / "last.ckpt")
    t = lightning_mp.Trainer(precision="bf16-master", max_steps=3, accelerator="cpu", logger=False,
                             callbacks=[ModelCheckpoint(dirpath=tmp_path / "ck", save_last=True)],
                             enable_progress_bar=False, enable_model_summary=False)
    with pytest.raises(UnsafeCheckpointError, match=r"last\.ckpt: holds"):
        t.fit(TinyRegressor(), regression_data(), ckpt_path="last")
    assert not marker.exists()
