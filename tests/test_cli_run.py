"""A ``lightning-mp-train`` run as a user sees it: exact resume, a final validation, its files,
its console, and per-job numbers in a sweep."""

import csv
import json

import lightning.pytorch as L
import pytest
import torch

from lightning_mp import ByteTextDataModule, MoEModule

from conftest import run_cli

SHORT = ["trainer.val_check_interval=10", "trainer.limit_val_batches=2", "data.max_bytes=200000",
         "callbacks.swallowed.every_n_steps=5"]


def summary(run_dir):
    return json.loads((run_dir / "summary.json").read_text())


@pytest.mark.slow
def test_resume_continues_as_one_run_through_the_command_line(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    latest = tmp_path / "outputs" / "tiny" / "latest"
    assert run_cli([*SHORT, "trainer.max_steps=30"], capsys, monkeypatch)[0] == 0
    straight = summary(latest)
    assert run_cli([*SHORT, "trainer.max_steps=15"], capsys, monkeypatch)[0] == 0
    first = latest.resolve()
    code, out, err = run_cli([*SHORT, "trainer.max_steps=30", "resume=outputs/tiny/latest"], capsys, monkeypatch)
    assert code == 0, err
    resumed = summary(latest)
    assert latest.resolve() != first and resumed["resumed_from"] == str(first / "checkpoints" / "last.ckpt")
    assert resumed["steps"] == 30
    for key in ("train_loss", "val_loss", "val_bits_per_byte"):
        assert resumed[key] == straight[key], key  # equal to the last digit
    assert "warning" not in out.lower()  # Lightning's "not resumable" warning is gone with the loader's state
    # and through ckpt_path= to a file
    code, _, err = run_cli([*SHORT, "trainer.max_steps=30", f"ckpt_path={first}/checkpoints/last.ckpt"], capsys, monkeypatch)
    assert code == 0, err
    assert summary(latest)["val_loss"] == straight["val_loss"]


def _fit(steps, ckpt_path=None, save=None):
    L.seed_everything(0, verbose=False)
    model = MoEModule(d_model=32, n_layers=1, n_heads=2, n_experts=4, d_ff=32, warmup_steps=3, decay_steps=12)
    trainer = L.Trainer(accelerator="cpu", max_steps=steps, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0)
    trainer.fit(model, ByteTextDataModule(seq_len=16, batch_size=4, max_bytes=50_000), ckpt_path=ckpt_path)
    if save:
        trainer.save_checkpoint(save)
    return model.state_dict()


@pytest.mark.slow
def test_resume_continues_as_one_run_through_trainer_fit(tmp_path):
    straight = _fit(12)
    _fit(5, save=tmp_path / "stop.ckpt")
    resumed = _fit(12, ckpt_path=tmp_path / "stop.ckpt")
    for key in straight:
        assert torch.equal(resumed[key], straight[key]), key


@pytest.mark.slow
def test_a_short_run_validates_at_its_end_and_writes_its_metrics(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code, out, _ = run_cli(["trainer.max_steps=5", "trainer.limit_val_batches=2", "data.max_bytes=200000"], capsys, monkeypatch)
    assert code == 0
    run = (tmp_path / "outputs" / "tiny" / "latest").resolve()
    s = summary(run)
    assert s["steps"] == 5 and s["val_loss"] > 0 and s["val_bits_per_byte"] > 0 and s["train_loss"] > 0
    rows = list(csv.DictReader(open(run / "metrics.csv")))
    assert any(r.get("val/loss") for r in rows) and any(r.get("train/loss") for r in rows)
    lines = out.splitlines()
    assert lines[0] == f"run directory: outputs/tiny/{run.name}" or lines[0].endswith(run.name)
    assert any(line.startswith("val step 5 | loss ") for line in lines)  # the final validation is printed
    step_line = next(line for line in lines if line.startswith("step 5/5"))
    assert len(step_line) < 120 and " | loss " in step_line and " | lr " in step_line and "tok/s" in step_line
    assert "elapsed" in step_line and "left" in step_line
    assert lines[-2].startswith("done: 5 steps") and lines[-1].startswith("run directory:")
    log = (run / "cli.log").read_text()
    assert "step 5/5" in log and "done: 5 steps" in log
    # no validation during the run, so no best checkpoint; one last.ckpt, at step 5 (not a last-v1.ckpt beside it)
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["last.ckpt"]
    assert torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 5
    for noise in ("will be deleted", "not supported by the model summary", "LeafSpec", "Tip", "GPU available"):
        assert noise not in out, noise


@pytest.mark.slow
def test_logger_none_runs(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code, _, err = run_cli(["trainer.max_steps=3", "trainer.limit_val_batches=1", "data.max_bytes=100000", "logger=none"],
                       capsys, monkeypatch)
    assert code == 0, err
    assert summary(tmp_path / "outputs" / "tiny" / "latest")["val_loss"] > 0


@pytest.mark.slow
def test_each_sweep_job_reports_its_own_peak_memory(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code, _, err = run_cli(["--multirun", "data.batch_size=768,4", "trainer.max_steps=2", "trainer.limit_val_batches=1",
                            "trainer.accelerator=cpu",  # the process RSS: a CPU run's memory, on any machine
                        "data.max_bytes=400000", "callbacks=none", "model.d_model=128"], capsys, monkeypatch)
    assert code == 0, err
    sweep = (tmp_path / "multirun" / "tiny" / "latest").resolve()
    big, small = (summary(sweep / f"{job}_bf16-master_seed0") for job in (0, 1))
    assert big["peak_memory_kind"] == "process peak RSS during this run"
    assert small["peak_memory_bytes"] < big["peak_memory_bytes"] / 2  # not the first job's peak (or its freed heap) again


@pytest.mark.slow
def test_seed_sweep_names_each_run_by_its_seed(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code, _, err = run_cli(["--multirun", "seed=0,1", "trainer.max_steps=2", "trainer.limit_val_batches=1",
                        "data.max_bytes=100000", "callbacks=none"], capsys, monkeypatch)
    assert code == 0, err
    sweep = (tmp_path / "multirun" / "tiny" / "latest").resolve()
    assert [summary(sweep / f"{i}_bf16-master_seed{i}")["seed"] for i in (0, 1)] == [0, 1]


@pytest.mark.slow
def test_ctrl_c_says_how_to_continue_and_the_resumed_run_ends_as_one(tmp_path, capsys, monkeypatch):
    import signal

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(signal, "signal", lambda *args: None)  # Lightning would ignore SIGINT in pytest afterwards
    args = ["trainer.max_steps=6", "trainer.limit_val_batches=1", "data.max_bytes=100000",
            "trainer.val_check_interval=2"]  # a checkpoint every 2 steps
    code, out, _ = run_cli([*args, "+callbacks.stop._target_=conftest.InterruptAt", "+callbacks.stop.step=3"], capsys,
                       monkeypatch)
    run = (tmp_path / "outputs" / "tiny" / "latest").resolve()
    assert code == 1
    line = next(line for line in out.splitlines() if line.startswith("interrupted at step 3"))
    command = line.split("to continue from its last checkpoint: ", 1)[1].split()
    assert command[0] == "lightning-mp-train" and command[-1] == f"resume=outputs/tiny/{run.name}"
    assert set(args) <= set(command)  # the run's own overrides, so the resumed run is the same run
    code, _, err = run_cli([a for a in command[1:] if "stop" not in a], capsys, monkeypatch)  # as printed, no Ctrl-C
    assert code == 0, err
    assert summary(tmp_path / "outputs" / "tiny" / "latest")["steps"] == 6


def test_the_first_run_does_not_count_the_kernel_build_as_training(tmp_path, capsys, monkeypatch):
    """On a fresh machine the fused step is built once before the run's clock starts: the summary's
    time and tokens/s are those of the last step line."""
    import re
    import time

    from lightning_mp import fused

    build = fused._build

    def slow_build():  # a cold build takes seconds (13 s on a 2-core AMD EPYC)
        time.sleep(3.0)
        return build()

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(fused, "_build", slow_build)
    monkeypatch.setattr(fused, "_library", None)
    monkeypatch.setattr(fused, "_tried", False)  # this process has not loaded the kernel yet
    start = time.perf_counter()
    code, out, err = run_cli(["trainer.max_steps=10", "trainer.log_every_n_steps=10", "trainer.limit_val_batches=1",
                              "callbacks=none"], capsys, monkeypatch)
    wall = time.perf_counter() - start
    assert code == 0, err
    s = summary(tmp_path / "outputs" / "tiny" / "latest")
    assert s["fit_seconds"] <= wall - 3.0  # the build's 3 s are not training time (on a machine of any speed)
    last = re.search(r"step 10/10 \| .* \| ([\d.]+k?) tok/s \| (\d+:\d\d) elapsed", out)
    done = re.search(r"done: 10 steps, (\d+:\d\d), ([\d.]+k?) tok/s", out)
    assert last and done, out
    assert (last.group(1), last.group(2)) == (done.group(2), done.group(1))  # the same clock, the same numbers


def test_a_cpu_run_on_a_gpu_machine_reports_its_own_memory(tmp_path, capsys, monkeypatch):
    """summary.json's peak memory is the run's device's: a CPU run on a machine with CUDA reports its
    process RSS, not CUDA's counter (about 0 for it)."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # a GPU machine, as far as the CLI asks
    code, _, err = run_cli(["trainer.accelerator=cpu", "trainer.max_steps=2", "trainer.limit_val_batches=1",
                            "data.max_bytes=100000", "callbacks=none"], capsys, monkeypatch)
    assert code == 0, err
    s = summary(tmp_path / "outputs" / "tiny" / "latest")
    assert s["peak_memory_kind"] == "process peak RSS during this run" and s["peak_memory_bytes"] > 100e6


@pytest.mark.slow
def test_8bit_moments_from_the_command_line_are_in_the_checkpoint(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code, _, err = run_cli(["trainer.max_steps=3", "trainer.limit_val_batches=1", "data.max_bytes=200000",
                            "optimizer.moment_dtype=8bit"], capsys, monkeypatch)
    assert code == 0, err
    saved = torch.load(tmp_path / "outputs" / "tiny" / "latest" / "checkpoints" / "last.ckpt", weights_only=True)
    states = saved["optimizer_states"][0]["state"].values()
    assert {s["exp_avg"].dtype for s in states} == {torch.int8} and all("exp_avg_sq_absmax" in s for s in states)
