"""MasterWeightPrecision under DDP: 2 CPU processes on gloo, each run as a script (Lightning's DDP
launcher re-executes the calling script, which must not be pytest)."""

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

SCRIPT = textwrap.dedent('''
    import sys
    import torch, lightning.pytorch as L
    sys.path.insert(0, {tests!r})
    from conftest import TinyRegressor, regression_data
    from lightning_mp import MasterWeightPrecision

    out, accumulate = sys.argv[1], int(sys.argv[2])

    class Save(L.Callback):
        def on_train_end(self, trainer, pl_module):
            masters = [p.detach().clone() for g in trainer.optimizers[0].param_groups for p in g["params"]]
            torch.save({{"masters": masters, "skipped": trainer.precision_plugin.skipped_steps}},
                       f"{{out}}/rank{{trainer.global_rank}}.pt")

    class NaNOnRank1(TinyRegressor):
        def training_step(self, batch, batch_idx):
            loss = super().training_step(batch, batch_idx)
            return loss * float("nan") if (batch_idx == 1 and self.global_rank == 1) else loss

    torch.manual_seed(0)
    trainer = L.Trainer(accelerator="cpu", devices=2, strategy="ddp", max_steps=3, accumulate_grad_batches=accumulate,
                        plugins=[MasterWeightPrecision("bf16-master")], callbacks=[Save()], logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(NaNOnRank1(), regression_data(n=64))
''')


def run(tmp_path: Path, accumulate: int) -> subprocess.CompletedProcess:
    script = tmp_path / "ddp_run.py"
    script.write_text(SCRIPT.format(tests=str(Path(__file__).parent)))
    return subprocess.run([sys.executable, str(script), str(tmp_path), str(accumulate)], cwd=tmp_path,
                          capture_output=True, text=True, timeout=300)


@pytest.mark.slow
def test_nan_on_one_rank_skips_the_step_on_both_and_masters_stay_equal(tmp_path):
    result = run(tmp_path, accumulate=1)
    assert result.returncode == 0, result.stderr[-3000:]
    rank0, rank1 = (torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1))
    assert rank0["skipped"] == rank1["skipped"] == 1  # the NaN reached both ranks through the all-reduce
    assert all(torch.equal(a, b) for a, b in zip(rank0["masters"], rank1["masters"]))


@pytest.mark.slow
def test_gradient_accumulation_across_processes_is_refused_clearly(tmp_path):
    result = run(tmp_path, accumulate=2)
    assert result.returncode != 0
    assert "does not support accumulate_grad_batches > 1 with several processes" in result.stderr
