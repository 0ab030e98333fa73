"""lightning-mp-report and lightning-mp-memory."""

import csv
import json

import pytest

from lightning_mp.cli import memory_main, report_main
from lightning_mp.report import write_report


def fake_run(path, precision, losses, swallowed):
    path.mkdir(parents=True)
    (path / "summary.json").write_text(json.dumps({
        "precision": precision, "train_loss": losses[-1], "val_loss": losses[-1] + 0.1, "val_bits_per_byte": 3.0,
        "bytes_per_param": 14.0, "tokens_per_sec": 1000.0,
    }))
    with open(path / "metrics.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, ["step", "train/loss", "precision/swallowed_frac"])
        writer.writeheader()
        for step, (loss, frac) in enumerate(zip(losses, swallowed)):
            writer.writerow({"step": 10 * step, "train/loss": loss, "precision/swallowed_frac": frac})


def test_report_writes_a_png_and_a_table(tmp_path):
    fake_run(tmp_path / "0_bf16-true", "bf16-true", [5.0, 4.9, 4.9], [0.9, 0.95, 0.97])
    fake_run(tmp_path / "1_bf16-master", "bf16-master", [5.0, 4.0, 3.0], [0.0, 0.0, 0.0])
    png, md = write_report(tmp_path)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    table = md.read_text()
    assert "| `bf16-true` | 4.900 | 5.000 | 3.00 | 0.970 | 14.00 | 1000 |" in table
    assert "| `bf16-master` | 3.000 | 3.100 | 3.00 | 0.000 | 14.00 | 1000 |" in table


def test_report_command_errors_clearly_on_an_empty_directory(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        report_main([str(tmp_path)])
    assert exit_info.value.code == 2 and "no run directories" in capsys.readouterr().err


def test_memory_command_prints_measured_and_estimated_bytes(capsys):
    memory_main(["--precision", "32-true", "bf16-master"])
    out = capsys.readouterr().out
    assert "| `32-true` | 4.00 | 0.00 | 4.00 | 8.00 | 0.00 | **16.00** | 16.00 |" in out
    assert "| `bf16-master` | 2.01 | 3.99 | 0.01 | 8.00 | 0.00 | **14.01** | 14.00 |" in out
