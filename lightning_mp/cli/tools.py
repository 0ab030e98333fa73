"""``lightning-mp-memory`` and ``lightning-mp-report``: the package's other two commands."""

from __future__ import annotations

import argparse
import contextlib
import logging
import sys
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Optional

import lightning.pytorch as L
import torch
from hydra.utils import instantiate

from lightning_mp.cli.args import DEFAULT_RECIPE, compose_recipe, options
from lightning_mp.memory import CATEGORIES, bytes_per_param, estimate_memory, memory_audit
from lightning_mp.optim.adamw import CANNOT_STEP

MEMORY_MODES = ("32-true", "bf16-mixed", "bf16-true", "bf16-master", "16-master")


class _AuditAfterStep(L.Callback):
    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        self.audit = memory_audit(pl_module, trainer.optimizers, trainer.precision_plugin)


def measure_memory(model_name: str, precision: str, seq_len: int = 16, batch_size: int = 2,
                   moment_dtype: str = "float32") -> dict[str, int]:
    """Bytes per category after one real AdamW step of a ``conf/model`` model under ``precision``
    (``moment_dtype``: the Adam moments' ``float32``, ``bfloat16`` or ``8bit``)."""
    from lightning_mp.precision import precision_plugin

    torch.manual_seed(0)
    cfg = compose_recipe(DEFAULT_RECIPE, [f"model={model_name}"])
    model = instantiate(cfg.model, moment_dtype=moment_dtype, _convert_="all")
    tokens = torch.randint(0, model.hparams.vocab_size, (batch_size, seq_len + 1))
    data = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(tokens[:, :-1], tokens[:, 1:]), batch_size=batch_size)
    audit = _AuditAfterStep()
    with _quiet():
        L.Trainer(
            max_steps=1, devices=1, plugins=[precision_plugin(precision)], callbacks=[audit], logger=False,
            enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        ).fit(model, data)
    return audit.audit


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """The measuring run's messages and warnings (Lightning's accelerator lines and tips, no
    validation data, the storage line that the table's masters column shows) left out, so that
    the table prints in one piece."""
    loggers = [logging.getLogger(name) for name in ("lightning.pytorch", "lightning_mp")]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)


def memory_main(argv: Optional[list[str]] = None) -> None:
    """``lightning-mp-memory``: training-state bytes per parameter, measured from live tensors after a step."""
    from lightning_mp.precision import PRECISION_NAMES

    parser = argparse.ArgumentParser(prog="lightning-mp-memory", description=memory_main.__doc__)
    parser.add_argument("--model", default="tiny", choices=options("model"), help="a conf/model option (default tiny)")
    parser.add_argument("--precision", nargs="+", default=None, choices=PRECISION_NAMES,
                        metavar="PRECISION", help=f"precision names (default: all of {', '.join(MEMORY_MODES)})")
    parser.add_argument("--moment-dtype", default="float32", choices=("float32", "bfloat16", "8bit"),
                        help="Adam's moments (default float32; bfloat16 and 8bit use lightning_mp.optim.AdamW)")
    args = parser.parse_args(argv)
    precisions, left_out = args.precision or list(MEMORY_MODES), []
    if args.moment_dtype != "float32":  # lightning-mp's AdamW, which some precisions' weights cannot take
        left_out = [name for name in precisions if name in CANNOT_STEP]
        if args.precision and left_out:
            parser.error(f"--moment-dtype {args.moment_dtype} needs lightning-mp's AdamW, which cannot step "
                         f"{left_out[0]} ({CANNOT_STEP[left_out[0]]})")
        precisions = [name for name in precisions if name not in left_out]
    print(f"model={args.model}, AdamW ({args.moment_dtype} moments), one training step; bytes per parameter "
          "(measured / estimated total)\n")
    print("| precision | " + " | ".join(CATEGORIES) + " | total | estimate | total bytes |")
    print("|---|" + "---|" * (len(CATEGORIES) + 3))
    for name in precisions:
        audit = measure_memory(args.model, name, moment_dtype=args.moment_dtype)
        per = bytes_per_param(audit)
        estimate = bytes_per_param(estimate_memory(audit["n_params"], name, "adamw", moment_dtype=args.moment_dtype))["total"]
        cells = " | ".join(f"{per[c]:.2f}" for c in CATEGORIES)
        print(f"| `{name}` | {cells} | **{per['total']:.2f}** | {estimate:.2f} | {audit['total']:,} |")
    for name in left_out:
        print(f"\n`{name}` left out: {args.moment_dtype} moments need lightning-mp's AdamW, which cannot step it "
              f"({CANNOT_STEP[name]}).")


def report_main(argv: Optional[list[str]] = None) -> None:
    """``lightning-mp-report <sweep dir>``: loss and swallowed-update curves (PNG) and a Markdown table."""
    from lightning_mp.report import write_report

    parser = argparse.ArgumentParser(prog="lightning-mp-report", description=report_main.__doc__)
    parser.add_argument("sweep_dir", type=Path, help="a --multirun directory (one run directory per job)")
    args = parser.parse_args(argv)
    try:
        png, md = write_report(args.sweep_dir.expanduser())
    except (FileNotFoundError, ValueError) as err:
        print(f"lightning-mp-report: error: {err}", file=sys.stderr)
        sys.exit(2)
    print(md.read_text())
    print(f"wrote {png} and {md}")
