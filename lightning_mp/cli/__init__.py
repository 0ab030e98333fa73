"""The commands: ``lightning-mp-train`` (a Hydra recipe with command-line overrides),
``lightning-mp-memory`` and ``lightning-mp-report``.

    lightning-mp-train recipe=<name> precision=<name> trainer.max_steps=200 model.n_experts=8
    lightning-mp-train recipe=mantissa-trap init_from=outputs/tiny/latest --multirun

One module per job: :mod:`~lightning_mp.cli.args` (the command line made Hydra's, checked before
it runs), :mod:`~lightning_mp.cli.checks` (every input's type and range, the corpus),
:mod:`~lightning_mp.cli.checkpoints` (the checkpoints it resumes or starts from), :mod:`~lightning_mp.cli.components`
(config to model, data and Trainer), :mod:`~lightning_mp.cli.run` (train, validate, summary),
:mod:`~lightning_mp.cli.console` (what it prints), :mod:`~lightning_mp.cli.tools` (the other two
commands). Each run writes to its own directory: the resolved ``config.yaml``, ``metrics.csv``,
``checkpoints/last.ckpt`` and the best checkpoint, ``summary.json`` and ``cli.log``.
"""

from __future__ import annotations

import sys

import hydra
from omegaconf import DictConfig

from lightning_mp.cli.args import compose_recipe, hydra_argv, preflight, recipe_dir, recipes
from lightning_mp.cli.components import build, output_dir, strategy_kind, tensorboard_if_installed
from lightning_mp.cli.checkpoints import LAST_CHECKPOINT, checkpoint_path
from lightning_mp.cli.checks import UsageError, check_types
from lightning_mp.cli.run import train
from lightning_mp.cli.tools import measure_memory, memory_main, report_main
from lightning_mp.parallel import exit_after_leaving

__all__ = [
    "LAST_CHECKPOINT",
    "UsageError",
    "build",
    "check_types",
    "checkpoint_path",
    "compose_recipe",
    "hydra_argv",
    "main",
    "measure_memory",
    "memory_main",
    "output_dir",
    "recipe_dir",
    "recipes",
    "report_main",
    "strategy_kind",
    "tensorboard_if_installed",
    "train",
]


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
        argv = hydra_argv(sys.argv[1:])
        preflight(argv)
    except UsageError as err:
        _fail(err)
    sys.argv[1:] = argv
    _hydra_main()
    exit_after_leaving()  # (a multi-process run: without the interpreter's teardown, where torch may abort)
