"""The README's examples run as written."""

import re
from pathlib import Path

import pytest
import torch

README = Path(__file__).resolve().parent.parent / "README.md"


def example(name: str) -> str:
    match = re.search(rf"<!-- readme-example: {name} -->\n```python\n(.*?)```", README.read_text(), re.S)
    assert match, f"README example {name!r} not found"
    return match.group(1)


@pytest.mark.slow
def test_subclass_example_runs(capsys):
    namespace: dict = {"__name__": "readme_example"}
    exec(compile(example("subclass"), "README.md", "exec"), namespace)
    trainer = namespace["trainer"]
    assert trainer.global_step == 30
    assert trainer.callback_metrics["train/loss"].item() < 5.0  # below uniform over bytes (5.55)
    assert namespace["model"].moe_layers[0].router[0].weight.dtype == torch.float32  # the custom router stays FP32
