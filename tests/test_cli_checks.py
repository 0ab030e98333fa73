"""Bad input to ``lightning-mp-train``: exit status 2, one line on stderr naming the key or file,
no traceback; the documented options and values that look odd to Hydra's grammar run."""

import sys

import pytest
import torch

from lightning_mp.cli import main

from conftest import run_cli

FAST = ["trainer.max_steps=2", "trainer.val_check_interval=2", "trainer.limit_val_batches=1", "data.max_bytes=100000"]


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "binary.dat").write_bytes(bytes(range(256)) * 40)
    (tmp_path / "empty").mkdir()
    (tmp_path / "binaries").mkdir()
    (tmp_path / "binaries" / "a.bin").write_bytes(b"\0\1\2" * 100)
    (tmp_path / "junk.ckpt").write_text("not a checkpoint")
    (tmp_path / "small.txt").write_text("too little text to hold out a sequence " * 10)
    return tmp_path


BAD = [
    (["seed=abc"], "seed=abc must be an integer"),
    (["optimizer.lr=-1"], "optimizer.lr=-1 must be > 0"),
    (["trainer.accumulate_grad_batches=0"], "trainer.accumulate_grad_batches=0 must be an integer >= 1"),
    (["data.num_workers=-1"], "data.num_workers=-1 must be an integer >= 0"),
    (["optimizer.moment_dtype=float8"], "optimizer.moment_dtype=float8 must be one of float32, bfloat16"),
    (["optimizer.impl=torchao"], "optimizer.impl=torchao must be one of auto, torchao-adamw, torchao-adamw8bit, optimi-adamw"),
    (["optimizer.impl=optimi-adamw"], "optimizer.impl=optimi-adamw steps bf16 weights itself: use it with precision=bf16-true (not bf16-master)"),
    (["precision=bf16-true", "optimizer.impl=optimi-adamw", "optimizer.moment_dtype=8bit"],
     "optimizer.impl=optimi-adamw keeps its own moments: leave optimizer.moment_dtype=float32"),
    (["precision=bf16-true", "optimizer.moment_dtype=8bit"], "optimizer.moment_dtype=8bit needs lightning-mp's AdamW, "
     "which cannot step precision=bf16-true (its bf16 weights keep no FP32 values): use precision=bf16-master"),
    (["precision=bf16-true", "optimizer.moment_dtype=bfloat16"], "optimizer.moment_dtype=bfloat16 needs lightning-mp's AdamW"),
    (["trainer.max_steps=abc"], "trainer.max_steps=abc must be an integer (the recipe's value: 250)"),
    (["trainer.max_steps=1e3"], "must be an integer (write 1000)"),
    (["model.n_experts=2.5"], "model.n_experts=2.5 must be an integer (the recipe's value: 4)"),
    (["model.n_experts=0"], "model.n_experts=0 must be an integer >= 1"),
    (["model.n_expert=3"], "model.n_expert: no such key (did you mean model.n_experts?"),
    (["trainer.precision=bf16-true"], "choose the precision with precision=<name>"),
    (["+trainer.precision=bf16-true"], "choose the precision with precision=<name>"),
    (["precision=bf16master"], "precision=bf16master: no such option (did you mean bf16-master?)"),
    (["--multirun", "precision=bf16-master,fp8"], "precision=fp8: no such option"),
    (["recipe=nope"], "unknown recipe 'nope'"),
    (["recipe=mantissa-trap"], "recipe=mantissa-trap needs init_from=<"),
    (["model.nope=1"], "model.nope: no such key"),
    (["data=text"], "data=text needs data.path=<"),
    (["data=text", "data.path=missing"], "data.path=missing: corpus path 'missing' does not exist"),
    (["data=text", "data.path=empty"], "data.path=empty: no non-empty text files under 'empty'"),
    (["data=text", "data.path=binaries"], "data.path=binaries: no non-empty text files"),
    (["data=text", "data.path=binary.dat"], "'binary.dat' is a binary file"),
    (["data.seq_len=100000", "model.max_seq_len=100000"], "seq_len=100000 is longer than the"),
    (["data=text", "data.path=small.txt"], "is longer than the validation split"),
    (["ckpt_path=junk.ckpt"], "junk.ckpt: not a Lightning checkpoint"),
    (["ckpt_path=nowhere.ckpt"], "ckpt_path=nowhere.ckpt: no such file"),
    (["resume=nowhere"], "resume=nowhere: no such directory"),
    (["resume=junk.ckpt"], "resume=junk.ckpt: a file: resume takes a run directory"),
    (["resume=empty"], "resume=empty: no checkpoints/last.ckpt in that run directory"),
    (["ckpt_path=junk.ckpt", "resume=empty"], "give either ckpt_path=<file> or resume=<run dir>, not both"),
    (["trainer.max_steps=-1", "trainer.max_epochs=-1"], "would train forever"),
    (["model.top_k=8"], "model.top_k=8 is more than model.n_experts=4"),
    (["model.n_groups=3"], "model.n_groups=3 must divide model.n_experts=4"),
    (["model.router_jitter=1.5"], "model.router_jitter=1.5 must be >= 0 and < 1"),
]


@pytest.mark.parametrize("args,message", BAD, ids=[" ".join(a) for a, _ in BAD])
def test_bad_input_is_one_line_naming_the_key(args, message, workdir, capsys, monkeypatch):
    code, _, err = run_cli([*FAST, *args], capsys, monkeypatch)
    assert code == 2
    assert err.startswith("lightning-mp-train: error: ") and message in err, err
    assert len(err.strip().splitlines()) == 1, err


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """A 2-step run of the default recipe: its directory."""
    root = tmp_path_factory.mktemp("finished")
    mp = pytest.MonkeyPatch()
    mp.chdir(root)
    mp.setattr(sys, "argv", ["lightning-mp-train", *FAST])
    main()
    mp.undo()
    return root / "outputs" / "tiny" / "latest"


@pytest.mark.slow
@pytest.mark.parametrize("args,message", [
    (["resume={run}", "trainer.max_steps=2"], "that run already trained 2 steps, trainer.max_steps=2: raise trainer.max_steps"),
    (["ckpt_path={run}/checkpoints/last.ckpt", "model.d_model=32", "trainer.max_steps=4"],
     "its weights do not fit this model (model.blocks.0"),
    (["resume={run}", "model.n_layers=3", "trainer.max_steps=4"], "missing model.blocks.2"),
    (["ckpt_path={truncated}", "trainer.max_steps=4"], "not a Lightning checkpoint, or a truncated one"),
    (["init_from={run}", "resume={run}", "trainer.max_steps=4"], "give one of them"),
])
def test_bad_checkpoints_are_one_line(args, message, finished_run, workdir, capsys, monkeypatch):
    truncated = workdir / "truncated.ckpt"
    truncated.write_bytes((finished_run / "checkpoints" / "last.ckpt").read_bytes()[:30000])
    args = [a.format(run=finished_run, truncated=truncated) for a in args]
    code, _, err = run_cli([*FAST[1:], *args], capsys, monkeypatch)
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1, err


@pytest.mark.slow
def test_values_hydra_cannot_lex_are_passed_as_written(workdir, capsys, monkeypatch):
    """``~`` after ``=`` (no shell expands it) and ``=`` inside a file name (the best checkpoint's)."""
    home = workdir / "home"
    (home / "my_corpus").mkdir(parents=True)
    (home / "my_corpus" / "a.txt").write_text("hello world, " * 4000)
    monkeypatch.setenv("HOME", str(home))
    code, out, err = run_cli([*FAST, "data=text", "data.path=~/my_corpus"], capsys, monkeypatch)
    assert code == 0, err
    (best,) = (workdir / "outputs" / "tiny" / "latest").resolve().joinpath("checkpoints").glob("best-*.ckpt")
    assert "=" in best.name
    code, out, err = run_cli([*FAST[1:], "trainer.max_steps=3", f"ckpt_path={best}"], capsys, monkeypatch)
    assert code == 0, err
    code, out, err = run_cli([*FAST, f"init_from={best}"], capsys, monkeypatch)
    assert code == 0, err


@pytest.mark.skipif(torch.cuda.is_available(), reason="CPU behaviour")
def test_fp16_on_a_cpu_without_fp16_is_one_line(workdir, capsys, monkeypatch):
    monkeypatch.setattr("lightning_mp.cli.components.fp16_supported", lambda device: False)
    for precision in ("16-master", "16-mixed"):
        code, _, err = run_cli([*FAST, f"precision={precision}"], capsys, monkeypatch)
        other = precision.replace("16", "bf16", 1)
        assert code == 2 and f"precision={precision} needs fp16 support" in err and f"use precision={other}" in err
