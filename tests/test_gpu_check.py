"""benchmarks/gpu_check.py's plumbing: every section runs at tiny sizes on the CPU (--dry-run) and lands
in the results file; on a GPU the same command measures."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_gpu_check_dry_run_writes_every_section(tmp_path):
    out = tmp_path / "gpu_check.json"
    result = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), "--dry-run", "--out", str(out)],
                            cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    results = json.loads(out.read_text())
    assert results["dry_run"] is True and "torch" in results["machine"]
    for section in ("gpu_tests", "sync_free", "optimizer_step", "compiled_vs_eager", "whole_runs", "moe_layer"):
        assert "error" not in results[section], results[section]
    assert results["gpu_tests"]["exit_status"] in (0, 5) and "skipped" in results["gpu_tests"]["summary"]  # no CUDA
    assert results["sync_free"]["bit_exact"] is True  # the device's loss scale: bit for bit with the synced path
    compiled = results["compiled_vs_eager"]["rows"]["remainder"]
    assert compiled["recompiles"] == 0 and compiled["max_ulps_of_the_update"] >= 0
    assert len(results["sync_free"]["scales_synced"]) == len(results["sync_free"]["scales_sync_free"]) == 12
    rows = results["optimizer_step"]["rows"]
    assert len(rows) == 2 + 4 * 2 and rows["torch AdamW(fused=True), FP32"]["vs_fused_fp32"] == 1.0
    runs = results["whole_runs"]["rows"]
    assert set(runs) == {"bf16-master", "bf16-master precision.master=remainder"}
    assert all(r["steps"] == 2 and r["tokens_per_sec"] > 0 and r["val_loss"] > 0 for r in runs.values()), runs
    assert results["moe_layer"]["moe_vs_dense"] > 0
