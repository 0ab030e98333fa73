"""lightning-mp-report and lightning-mp-memory."""

import csv
import json

import pytest

from lightning_mp.cli import memory_main, report_main
from lightning_mp.report import load_run, plot, running_mean, sweep_runs, write_report


def fake_run(path, precision, losses, swallowed, val=(), seed=0):
    path.mkdir(parents=True)
    (path / "summary.json").write_text(json.dumps({
        "precision": precision, "seed": seed, "train_loss": losses[-1], "val_loss": losses[-1] + 0.1, "val_bits_per_byte": 3.0,
        "bytes_per_param": 14.0, "tokens_per_sec": 1000.0,
    }))
    with open(path / "metrics.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, ["step", "train/loss", "precision/swallowed_frac", "val/loss"])
        writer.writeheader()
        for step, (loss, frac) in enumerate(zip(losses, swallowed)):
            writer.writerow({"step": 10 * step, "train/loss": loss, "precision/swallowed_frac": frac})
        for step, loss in val:  # validation checks: rows of their own
            writer.writerow({"step": step, "val/loss": loss})


def test_report_writes_a_png_and_a_table(tmp_path):
    fake_run(tmp_path / "0_bf16-true", "bf16-true", [5.0, 4.9, 4.9], [0.9, 0.95, 0.97])
    fake_run(tmp_path / "1_bf16-master", "bf16-master", [5.0, 4.0, 3.0], [0.0, 0.0, 0.0])
    png, md = write_report(tmp_path)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    table = md.read_text()
    assert "| `bf16-true` | 4.900 | 5.000 | 3.00 | 0.970 | 14.00 | 1000 |" in table
    assert "| `bf16-master` | 3.000 | 3.100 | 3.00 | 0.000 | 14.00 | 1000 |" in table
    fake_run(tmp_path / "2_32-true", "32-true", [5.0, 4.0, 3.0], [0.5, 0.6, 0.7])
    _, md = write_report(tmp_path)
    assert "| `32-true` | 3.000 | 3.100 | 3.00 | 0.700 (would be, in 16 bits) | 14.00 | 1000 |" in md.read_text()


def test_report_plots_validation_checks_and_reads_them_back(tmp_path):
    flat = [(10 * k, 2.0) for k in range(1, 5)]  # a stalled run's validation loss: equal checks all kept
    fake_run(tmp_path / "0_bf16-true", "bf16-true", [2.0] * 30, [0.97] * 30, val=flat)
    fake_run(tmp_path / "1_bf16-master", "bf16-master", [2.0 - 0.01 * k for k in range(30)], [0.0] * 30,
             val=[(10 * k, 2.0 - 0.05 * k) for k in range(1, 5)])
    assert load_run(tmp_path / "0_bf16-true")["curves"]["val/loss"] == flat
    png, _ = write_report(tmp_path)
    assert png.stat().st_size > 10_000


def test_two_validation_checks_get_their_panel_and_fp32_would_be_lines_their_own(tmp_path):
    fake_run(tmp_path / "0_32-true", "32-true", [5.0, 4.0, 3.0], [0.9, 0.95, 0.97], val=[(10, 4.0), (20, 3.0)])
    fake_run(tmp_path / "1_bf16-true", "bf16-true", [5.0, 4.9, 4.9], [0.9, 0.95, 0.97], val=[(10, 4.9), (20, 4.9)])
    title, panels = plot(sweep_runs(tmp_path), tmp_path / "p.png")
    assert panels[1] == "validation loss"
    # bf16-true's real fraction and 32-true's hypothetical one, equal here, are drawn on separate axes
    assert [p.split("\n")[0] for p in panels[2:]] == ["swallowed updates", "updates 16-bit weights"]
    assert "same seed" in title


def test_seed_sweep_labels_each_run_by_its_seed(tmp_path):
    for job, seed in enumerate((0, 1)):
        fake_run(tmp_path / f"{job}_bf16-master_seed{seed}", "bf16-master", [5.0, 4.0], [0.0, 0.0], seed=seed)
    title, _ = plot(sweep_runs(tmp_path), tmp_path / "p.png")
    assert "seeds 0, 1" in title and "same seed" not in title
    table = write_report(tmp_path)[1].read_text()
    assert "| `bf16-master seed=0` |" in table and "| `bf16-master seed=1` |" in table


def test_one_step_sweep_still_draws_points(tmp_path):
    import matplotlib.pyplot as plt
    import numpy as np

    fake_run(tmp_path / "0_bf16-master", "bf16-master", [5.0], [0.0], val=[(0, 5.1)])
    png, _ = write_report(tmp_path)
    pixels = plt.imread(png)[..., :3]
    blue = np.abs(pixels - np.array([0x1F, 0x77, 0xB4]) / 255).max(axis=-1) < 0.05  # the first run's colour
    assert blue.sum() > 100  # markers in each panel (a lone point draws no line)


def test_running_mean_averages_the_window_before_each_point():
    assert running_mean([1.0, 2.0, 3.0, 4.0, 5.0], 2) == [1.0, 1.5, 2.5, 3.5, 4.5]
    assert running_mean([1.0, 2.0, 3.0, 4.0, 5.0], 3) == [1.0, 1.5, 2.0, 3.0, 4.0]
    assert running_mean([7.0, 1.0], 1) == [7.0, 1.0]


def test_report_command_errors_clearly_on_an_empty_directory(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        report_main([str(tmp_path)])
    assert exit_info.value.code == 2 and "no run directories" in capsys.readouterr().err


def test_memory_command_prints_measured_and_estimated_bytes(capsys):
    memory_main(["--precision", "32-true", "bf16-master"])
    out = capsys.readouterr().out
    assert "| `32-true` | 4.00 | 0.00 | 4.00 | 8.00 | 0.00 | **16.00** | 16.00 |" in out
    assert "| `bf16-master` | 2.01 | 1.99 | 0.00 | 8.00 | 0.00 | **12.00** | 12.00 |" in out  # remainders; grads die in the step


def test_memory_command_with_8bit_moments(capsys):
    memory_main(["--precision", "bf16-master", "--moment-dtype", "8bit"])
    row = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("| `bf16-master`"))
    cells = [c.strip(" *") for c in row.split("|")[2:-1]]
    state, total, estimate = float(cells[3]), float(cells[5]), float(cells[6])
    assert 2.0 < state < 2.1 and 6.0 < total < 6.1 and abs(total - estimate) < 0.05  # 1 byte per moment + scales


def test_memory_command_leaves_out_the_precisions_8bit_moments_cannot_step(capfd):
    memory_main(["--moment-dtype", "8bit"])
    out, err = capfd.readouterr()
    rows = [line.split(" | ")[0] for line in out.splitlines() if line.startswith("| `")]
    assert rows == ["| `32-true`", "| `bf16-mixed`", "| `bf16-master`", "| `16-master`"]
    assert out.rstrip().endswith("`bf16-true` left out: 8bit moments need lightning-mp's AdamW, which cannot step it "
                                 "(its bf16 weights keep no FP32 values).")
    assert err == ""  # the table in one piece: no Lightning lines or warnings between its rows


def test_memory_command_refuses_8bit_moments_for_a_precision_named_that_cannot_take_them(capsys):
    with pytest.raises(SystemExit) as exit_info:
        memory_main(["--precision", "bf16-master", "bf16-true", "--moment-dtype", "8bit"])
    out, err = capsys.readouterr()
    assert exit_info.value.code == 2 and out == ""
    assert err.strip().splitlines()[-1] == ("lightning-mp-memory: error: --moment-dtype 8bit needs lightning-mp's AdamW, "
                                           "which cannot step bf16-true (its bf16 weights keep no FP32 values)")


@pytest.mark.parametrize("args,named", [(["--precision", "fp8"], "--precision"), (["--model", "nope"], "--model")])
def test_memory_command_refuses_bad_names_before_printing(args, named, capsys):
    with pytest.raises(SystemExit) as exit_info:
        memory_main(args)
    out, err = capsys.readouterr()
    assert exit_info.value.code == 2 and out == "" and f"argument {named}: invalid choice" in err
    assert "Traceback" not in err
