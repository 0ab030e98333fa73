"""The README's and the docs' examples run as written."""

import math
import re
import shlex
from pathlib import Path

import pytest
import torch

from conftest import run_cli

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
PAGES = [README, *sorted((ROOT / "docs").glob("*.md"))]  # the README first, then the docs pages


def all_text() -> str:
    return "\n".join(page.read_text() for page in PAGES)


def example(name: str) -> str:
    match = re.search(rf"<!-- readme-example: {name} -->\n```python\n(.*?)```", all_text(), re.S)
    assert match, f"example {name!r} not found in the README or docs/"
    return match.group(1)


@pytest.mark.slow
def test_trainer_example_runs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # where a user runs it: its checkpoints land here
    namespace: dict = {"__name__": "readme_example"}
    exec(compile(example("trainer"), "README.md", "exec"), namespace)
    trainer = namespace["trainer"]
    assert trainer.global_step == 20
    assert trainer.callback_metrics["train/loss"].item() < 5.55  # below uniform over bytes, ln 256
    assert trainer.precision_plugin.store is not None  # the FP32 values live in the plugin's store


def test_fabric_example_runs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    namespace: dict = {"__name__": "readme_example"}
    exec(compile(example("fabric"), "README.md", "exec"), namespace)
    fabric, model = namespace["fabric"], namespace["model"]
    plugin = fabric.strategy.precision
    assert plugin.precision == "bf16-master" and namespace["step"] == 19
    assert model.module[0].weight.dtype == torch.bfloat16  # 16-bit weights...
    assert model.state_dict()["0.weight"].dtype == torch.float32  # ...whose FP32 values the state dict holds
    assert not torch.equal(model.state_dict()["0.weight"], model.module[0].weight.float())  # (not a rounded copy)


def test_every_python_block_is_python():
    """Every Python block of the README and the docs parses (the runnable ones also run, above)."""
    for page in PAGES:
        for block in re.findall(r"```python\n(.*?)```", page.read_text(), re.S):
            compile(block, str(page), "exec")


@pytest.mark.slow
def test_subclass_example_runs(capsys):
    namespace: dict = {"__name__": "readme_example"}
    exec(compile(example("subclass"), "README.md", "exec"), namespace)
    trainer = namespace["trainer"]
    assert trainer.global_step == 30
    assert trainer.callback_metrics["train/loss"].item() < 5.0  # below uniform over bytes (5.55)
    assert namespace["model"].moe_layers[0].router[0].weight.dtype == torch.float32  # the custom router stays FP32


# -- every command line in the README, run as a shell would pass it -----------------------------

COMMANDS = ("lightning-mp-train", "lightning-mp-report", "python -m lightning_mp")
NEEDS_A_GPU = ("recipe=gpu-100m", "torchrun", "srun")
# Several processes: Lightning re-executes the command for each rank, which in-process would be
# pytest; tests/test_fsdp2.py runs that command line as a subprocess.
SEVERAL_PROCESSES = ("trainer.devices=2",)


def command_lines() -> list[str]:
    """The ``bash`` blocks' lines that run our commands, in README then docs order (continuations joined,
    comments dropped); a GPU recipe or a multi-node launch cannot run here, a multi-process
    one runs in tests/test_fsdp2.py."""
    lines = []
    for block in re.findall(r"```bash\n(.*?)```", all_text(), re.S):
        for line in block.replace("\\\n", " ").splitlines():
            line = shlex.split(line, comments=True)
            text = shlex.join(line)
            if text.startswith(COMMANDS) and not any(g in text for g in (*NEEDS_A_GPU, *SEVERAL_PROCESSES)):
                lines.append(line)
    return lines


def shortened(args: list[str]) -> list[str]:
    """A command shortened to a few steps: step counts divided by 125 (250 -> 2, 500 -> 4, so a
    resume still goes past the run it resumes), little data, one validation batch."""
    def scaled(arg: str) -> str:
        key, _, value = arg.partition("=")
        if key in ("trainer.max_steps", "trainer.val_check_interval") and value.isdigit():
            return f"{key}={math.ceil(int(value) / 125)}"
        return arg

    args = [scaled(a) for a in args]
    keys = {a.partition("=")[0] for a in args}
    extra = {"trainer.max_steps": "2", "trainer.limit_val_batches": "1", "data.max_bytes": "100000",
             "trainer.log_every_n_steps": "1"}
    return args + [f"{k}={v}" for k, v in extra.items() if k not in keys]


def run_command(args: list[str], capsys, monkeypatch) -> tuple[int, str]:
    """The exit status and stderr of a README command line, shortened, run in this process."""
    from lightning_mp.cli import report_main

    if args[0] == "lightning-mp-report":
        code = report_main(args[1:]) or 0
        return code, capsys.readouterr().err
    rest = args[3:] if args[:3] == ["python", "-m", "lightning_mp"] else args[1:]
    code, _, err = run_cli(shortened(rest), capsys, monkeypatch)
    return code, err


@pytest.mark.slow
def test_every_command_line_runs(tmp_path, monkeypatch, capsys):
    home = tmp_path / "home"
    (home / "my_corpus").mkdir(parents=True)
    for name in ("notes.md", "essay.txt", "log.txt"):  # a user's corpus: one small text file each
        (home / "my_corpus" / name).write_text(f"{name}: the quick brown fox jumps over the lazy dog. " * 300)
    monkeypatch.setenv("HOME", str(home))
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    lines = command_lines()
    assert len(lines) >= 12, lines
    for args in lines:
        code, err = run_command(args, capsys, monkeypatch)
        assert code == 0, f"{shlex.join(args)}: exit {code}\n{err[-2000:]}"
    summaries = list(work.glob("**/summary.json"))
    assert len(summaries) > len(lines)  # sweeps write one per job
    assert (work / "multirun" / "mantissa-trap" / "latest" / "report.md").is_file()
