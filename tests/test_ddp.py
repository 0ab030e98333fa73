"""MasterWeightPrecision under DDP: 2 CPU processes on gloo, each run as a script (Lightning's DDP
launcher re-executes the calling script, which must not be pytest)."""

import json
import math
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from roundoff import U, gamma

SCRIPT = textwrap.dedent('''
    import json, sys
    import torch, lightning.pytorch as L
    from torch.utils.data import DataLoader, Subset, TensorDataset
    sys.path.insert(0, {tests!r})
    from conftest import Dot, TinyRegressor, regression_data
    from lightning_mp import precision_plugin
    from lightning_mp.parallel import exit_after_leaving, leave_process_group

    args = json.loads(sys.argv[1])

    class Save(L.Callback):
        def on_train_end(self, trainer, pl_module):
            params = [p for g in trainer.optimizers[0].param_groups for p in g["params"]]
            store = getattr(trainer.precision_plugin, "store", None)  # the FP32 values of bf16 weights
            values = [v.float().clone() for v in (store.values(params) if store else params)]
            storage = sum(t.numel() * t.element_size() for t in store.tensors()) if store else 0
            torch.save({{"masters": values, "skipped": getattr(trainer.precision_plugin, "skipped_steps", 0),
                        "storage_bytes": storage}}, f"{{args['out']}}/rank{{trainer.global_rank}}.pt")

    class Model(TinyRegressor):
        def training_step(self, batch, batch_idx):
            loss = super().training_step(batch, batch_idx)
            nan = args.get("nan_at") == batch_idx and self.global_rank == 1
            return loss * float("nan") if nan else loss

    class HalveInHook(L.Callback):  # the user's hook, on the module's parameters
        def on_before_optimizer_step(self, trainer, pl_module, optimizer):
            for p in pl_module.parameters():
                p.grad.mul_(0.5)

    name = args.get("precision", "bf16-master")
    options = {{k: args[k] for k in ("master", "grad_reduce_dtype") if k in args}}
    world = args["devices"]
    trainer = L.Trainer(accelerator="cpu", devices=world, strategy="ddp" if world > 1 else "auto",
                        max_steps=args["steps"], accumulate_grad_batches=args.get("accumulate", 1),
                        plugins=[precision_plugin(name, **options)], use_distributed_sampler=False,
                        callbacks=[Save(), *([HalveInHook()] if args.get("halve_in_hook") else [])], logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False)
    if args["model"] == "dot":  # rank 0 sees x = 1, rank 1 sees x = 2**-9: dloss/dw = x
        model, dataset, batch_size = Dot(d=4, lr=1.0), TensorDataset(torch.tensor([[1.0] * 4, [2.0**-9] * 4])), 1
    else:
        torch.manual_seed(0)
        model = Model(optimizer=args.get("optimizer", "adamw"), scheduler=True)
        dataset, batch_size = regression_data(n=args["n"]).dataset, args["batch_size"]
    if args.get("frozen"):  # a frozen weight of bf16 numbers on rank 0 only: the ranks disagree on its storage
        model.inp.weight.requires_grad_(False)
        if trainer.global_rank == 0:
            model.inp.weight.data = model.inp.weight.data.bfloat16().float()
    # Rank r takes every world-th batch, so a step's micro-batches on all ranks are consecutive
    # samples: the same samples as one process's batch of world x accumulate x batch_size.
    mine = [i for i in range(len(dataset)) if (i // batch_size) % world == trainer.global_rank]
    data = DataLoader(Subset(dataset, mine), batch_size=batch_size)
    trainer.fit(model, data, ckpt_path=args.get("ckpt_in"))
    leave_process_group()
    if args.get("ckpt_out"):
        trainer.save_checkpoint(args["ckpt_out"])
    exit_after_leaving()  # (without the interpreter's teardown, where torch may abort)
''')


def run(tmp_path: Path, name: str, **args) -> list[dict]:
    """Run the script in ``tmp_path/name`` and return each rank's saved masters."""
    out = tmp_path / name
    out.mkdir()
    script = tmp_path / "ddp_run.py"
    script.write_text(SCRIPT.format(tests=str(Path(__file__).parent)))
    args = {"out": str(out), "devices": 2, "model": "regressor", "n": 64, "batch_size": 8, "steps": 3, **args}
    result = subprocess.run([sys.executable, str(script), json.dumps(args)], cwd=tmp_path, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return [torch.load(out / f"rank{r}.pt") for r in range(args["devices"])]


def test_ranks_that_disagree_on_a_frozen_weights_storage_all_keep_rank_0s_value(tmp_path):
    """Each rank decides from its own values that a frozen weight needs no storage beside it (its
    values are bf16 numbers) or an int16 remainder; the setup's broadcast of rank 0's values still
    lists the same tensors on both ranks (else the collective would mismatch), and both ranks end
    with rank 0's value, kept the same way."""
    ranks = run(tmp_path, "frozen", frozen=True, steps=2)
    for a, b in zip(ranks[0]["masters"], ranks[1]["masters"]):
        assert torch.equal(a, b)
    frozen = ranks[0]["masters"][0]  # inp.weight, first in the optimizer's groups: rank 0's bf16 numbers
    assert torch.equal(frozen, frozen.bfloat16().float())
    # remainders beside the trained bf16 weights only: inp.bias (16), out.weight (16), out.bias (1)
    assert ranks[0]["storage_bytes"] == ranks[1]["storage_bytes"] == 2 * 33


def launch(script: Path, out: Path, **args) -> Path:
    """Run ``script`` with ``args`` (JSON, plus ``out``) in one process that starts its ranks; its output folder."""
    out.mkdir()
    result = subprocess.run([sys.executable, str(script), json.dumps({"out": str(out), **args})], cwd=script.parent,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return out


def equal_masters(a: dict, b: dict) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a["masters"], b["masters"]))


@pytest.mark.slow
def test_nan_on_one_rank_skips_the_step_on_both_and_masters_stay_equal(tmp_path):
    rank0, rank1 = run(tmp_path, "nan", nan_at=1)
    assert rank0["skipped"] == rank1["skipped"] == 1  # the NaN reached both ranks through the all-reduce
    assert equal_masters(rank0, rank1)


@pytest.mark.slow
@pytest.mark.parametrize("master, optimizer", [("fp32", "adamw"), ("remainder", "mp-adamw")])
def test_accumulation_across_ranks_equals_one_process_with_the_global_batch(tmp_path, master, optimizer):
    # 2 ranks x 2 micro-batches of 8 = the same 32 samples per step as one process with batches of 32.
    # Rank 1's first micro-batch of step 3 is NaN: that step is skipped on both ranks, leaving step 2's masters.
    rank0, rank1 = run(tmp_path, "ddp", n=128, accumulate=2, master=master, optimizer=optimizer, nan_at=4)
    (single,) = run(tmp_path, "single", devices=1, n=128, batch_size=32, steps=2, master=master, optimizer=optimizer)
    assert equal_masters(rank0, rank1)  # the FP32 sums of both micro-batches were reduced
    assert rank0["skipped"] == rank1["skipped"] == 1
    for a, b in zip(rank0["masters"], single["masters"]):  # equal up to bf16 compute noise (0.5 % measured)
        assert (a - b).abs().max() <= 2e-2 * b.abs().max()


@pytest.mark.slow
def test_fp32_gradient_reduction_keeps_what_bf16_reduction_rounds_away(tmp_path):
    # Grads 1 and 2**-9 average to 0.5 + 2**-10, which bf16 rounds to 0.5; SGD with lr 1 then moves w from 1.
    bf16 = run(tmp_path, "bf16", model="dot", steps=1)[0]["masters"][0]
    fp32_reduce = run(tmp_path, "fp32_reduce", model="dot", steps=1, grad_reduce_dtype="fp32")[0]["masters"][0]
    assert torch.all(fp32_reduce == 1 - (0.5 + 2**-10))  # exactly what a 32-true run computes
    assert torch.all(bf16 == 0.5)  # the 2**-10 was lost in the bf16 sum
    # the storage policies reduce in FP32 through a DDP hook too, and their ranks stay equal
    rank0, rank1 = run(tmp_path, "remainder", optimizer="mp-adamw", master="remainder", grad_reduce_dtype="fp32")
    assert equal_masters(rank0, rank1)


@pytest.mark.slow
def test_a_hook_on_the_parameters_gradients_acts_on_the_reduced_fp32_gradient(tmp_path):
    # The FP32 average of 1 and 2**-9 (0.5 + 2**-10), halved in on_before_optimizer_step, then SGD at lr 1:
    # w = 1 - (0.25 + 2**-11) on both ranks, as under 32-true. Halving a rank's own bf16 gradient instead
    # would change nothing (the step uses the reduced FP32 one): w = 0.5 - 2**-10.
    ranks = run(tmp_path, "hook", model="dot", steps=1, grad_reduce_dtype="fp32", halve_in_hook=True)
    for rank in ranks:
        assert torch.equal(rank["masters"][0], torch.full((1, 4), 0.75 - 2.0**-11))


@pytest.mark.slow
def test_ddp_resume_is_bit_exact(tmp_path):
    # one batch per rank per epoch: Lightning replays a batch when resuming mid-epoch
    opts = dict(n=16, batch_size=8)
    straight = run(tmp_path, "straight", steps=4, **opts)
    run(tmp_path, "half", steps=2, ckpt_out=str(tmp_path / "half.ckpt"), **opts)
    resumed = run(tmp_path, "resumed", steps=4, ckpt_in=str(tmp_path / "half.ckpt"), **opts)
    assert equal_masters(straight[0], resumed[0]) and equal_masters(straight[1], resumed[1])
    assert equal_masters(resumed[0], resumed[1])


@pytest.mark.slow
def test_torchrun_launch_line_writes_one_run_directory(tmp_path):
    # The README's torchrun line, on 2 CPU processes: one run directory, written by rank 0 alone.
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=2", "-m", "lightning_mp", "trainer=ddp",
           "trainer.accelerator=cpu", "trainer.devices=2", "trainer.max_steps=4", "trainer.val_check_interval=4",
           "trainer.limit_val_batches=2", "data.max_bytes=200000", "callbacks=none", "logger=csv",
           f"hydra.run.dir={tmp_path / 'run'}"]
    result = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("done: 4 steps") == 1  # rank 0 alone prints
    assert result.stdout.count("run directory:") == 2  # first and last, rank 0's
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["steps"] == 4 and summary["master"] == "auto"  # the default storage


LEAVE_SCRIPT = textwrap.dedent('''
    import atexit, sys, threading, time
    import torch.distributed as dist
    from lightning_mp.parallel import exit_after_leaving, leave_process_group

    rank, world, path = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
    dist.init_process_group("gloo", init_method=f"file://{path}", rank=rank, world_size=world)
    atexit.register(lambda: print(f"rank {rank}: exit handlers ran", end=""))
    worker = threading.Thread(target=lambda: (time.sleep(1), print(f"rank {rank}: thread done ", end="")))
    worker.start()  # (not a daemon: the exit waits for it, before the exit handlers)
    print(f"rank {rank}: buffered", end="")  # no newline: in the buffer until a flush
    leave_process_group()
    exit_after_leaving()
    print(f"rank {rank}: returned")
''')


@pytest.mark.parametrize("world", [1, 2])
def test_a_process_that_left_a_group_of_several_exits_with_its_exit_handlers_run(tmp_path, world):
    # A rank of a group of 2 ends in exit_after_leaving as an exit begins (its other threads joined,
    # then its exit handlers run, its output flushed), exit code 0, and nothing after the call
    # runs. A single process returns from it.
    script = tmp_path / "leave.py"
    script.write_text(LEAVE_SCRIPT)
    ranks = [subprocess.Popen([sys.executable, str(script), str(r), str(world), str(tmp_path / "rendezvous")],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for r in range(world)]
    for r, proc in enumerate(ranks):
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err[-3000:]
        buffered, thread, handlers = f"rank {r}: buffered", f"rank {r}: thread done ", f"rank {r}: exit handlers ran"
        if world > 1:
            assert out == buffered + thread + handlers
        else:  # (the thread and the line after the call, in either order)
            returned = f"rank {r}: returned\n"
            assert out in (buffered + returned + thread + handlers, buffered + thread + returned + handlers)


MOE_SCRIPT = textwrap.dedent('''
    import json, sys
    import torch, lightning.pytorch as L
    from torch.utils.data import DataLoader, Subset, TensorDataset
    from lightning_mp import MoEModule
    from lightning_mp.parallel import exit_after_leaving, leave_process_group

    args = json.loads(sys.argv[1])
    world = args["devices"]

    class Save(L.Callback):
        aux = None

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if batch_idx == 0:  # the first micro-batch's balancing loss, per layer
                self.aux = torch.stack([m.aux_loss.detach() for m in pl_module.moe_layers])

        def on_train_end(self, trainer, pl_module):
            bias = torch.cat([m.balance.bias for m in pl_module.moe_layers])
            torch.save({"bias": bias, "aux": self.aux}, f"{args['out']}/rank{trainer.global_rank}.pt")

    torch.manual_seed(0)
    tokens = torch.randint(0, 256, (32, 17))
    dataset = TensorDataset(tokens[:, :-1], tokens[:, 1:])
    # lr 0: the weights, hence every token's routing, stay those of the start on every rank and in
    # the single process, so the biases differ only if the counts they move by do
    model = MoEModule(d_model=32, n_layers=2, n_heads=2, n_experts=4, d_ff=32, max_seq_len=16, bias_update_rate=0.01,
                      lr=0.0, aux_loss_scope=args["scope"])
    model.configure_model()  # the weights now, from the seed above, whatever fit draws from the generator first
    trainer = L.Trainer(accelerator="cpu", devices=world, strategy="ddp" if world > 1 else "auto", precision="32-true",
                        max_steps=2, accumulate_grad_batches=2, use_distributed_sampler=False, callbacks=[Save()],
                        logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        limit_val_batches=0)
    batch_size = 4 * 2 // world  # a step's global batch: 2 micro-batches of 8 sequences over all ranks
    mine = [i for i in range(len(dataset)) if (i // batch_size) % world == trainer.global_rank]
    trainer.fit(model, DataLoader(Subset(dataset, mine), batch_size=batch_size))
    leave_process_group()
    exit_after_leaving()  # (without the interpreter's teardown, where torch may abort)
''')


@pytest.mark.slow
def test_expert_bias_and_global_balancing_loss_are_the_global_batchs_on_every_rank(tmp_path):
    script = tmp_path / "moe_ddp.py"
    script.write_text(MOE_SCRIPT)
    outs = {world: launch(script, tmp_path / f"world{world}-global", devices=world, scope="global") for world in (1, 2)}
    (single,), (rank0, rank1) = ([torch.load(out / f"rank{r}.pt") for r in range(world)] for world, out in outs.items())
    assert single["bias"].abs().max() > 0  # it moved
    assert torch.equal(rank0["bias"], rank1["bias"]) and torch.equal(rank0["bias"], single["bias"])
    # E * sum_i f_i * P_i with f over both ranks: the ranks' mean is the single process's loss on both halves
    # each a sum of at most 512 + 8 positive terms (router probabilities over the tokens, then over the
    # experts): within gamma_520 of the exact value in any summation order, and the mean rounds once more
    rtol = 2 * gamma(520) + U
    torch.testing.assert_close((rank0["aux"] + rank1["aux"]) / 2, single["aux"], rtol=rtol, atol=0)


VALIDATION_SCRIPT = textwrap.dedent('''
    import json, sys
    import torch, lightning.pytorch as L
    from torch.utils.data import DataLoader, Subset, TensorDataset
    from lightning_mp import MoEModule
    from lightning_mp.parallel import exit_after_leaving, leave_process_group

    args = json.loads(sys.argv[1])
    world = args["devices"]
    torch.manual_seed(0)
    tokens = torch.randint(0, 256, (13, 17))
    dataset = TensorDataset(tokens[:, :-1], tokens[:, 1:])
    model = MoEModule(d_model=32, n_layers=1, n_heads=2, n_experts=4, d_ff=32, max_seq_len=16)
    model.configure_model()
    trainer = L.Trainer(accelerator="cpu", devices=world, strategy="ddp" if world > 1 else "auto", precision="32-true",
                        use_distributed_sampler=False, logger=False, enable_progress_bar=False,
                        enable_model_summary=False)
    # rank 0: 10 sequences in batches of 4, 4 and 2; rank 1: 3 in one batch (one process: all four batches)
    ranges = [range(0, 10), range(10, 13)] if world > 1 else [range(0, 13)]
    mine = ranges[trainer.global_rank]
    batches = [list(mine[i:i + 4]) for i in range(0, len(mine), 4)] if world > 1 else [
        [0, 1, 2, 3], [4, 5, 6, 7], [8, 9], [10, 11, 12]]
    data = DataLoader(dataset, batch_sampler=batches)
    trainer.validate(model, data, verbose=False)
    metrics = {k: v.item() for k, v in trainer.callback_metrics.items()}
    logits = model(tokens[:, :-1])  # every token's loss at once, in float64: the closed form
    per_token = torch.nn.functional.cross_entropy(logits.double().reshape(-1, 256), tokens[:, 1:].reshape(-1),
                                                  reduction="none")
    metrics["closed_form"] = per_token.mean().item()
    json.dump(metrics, open(f"{args['out']}/rank{trainer.global_rank}.json", "w"))
    leave_process_group()
    exit_after_leaving()  # (without the interpreter's teardown, where torch may abort)
''')


@pytest.mark.slow
def test_validation_loss_is_token_weighted_over_uneven_batches_and_ranks(tmp_path):
    script = tmp_path / "validate.py"
    script.write_text(VALIDATION_SCRIPT)
    outs = {world: launch(script, tmp_path / f"world{world}", devices=world) for world in (1, 2)}
    (single,), (rank0, rank1) = ([json.loads((out / f"rank{r}.json").read_text()) for r in range(world)]
                                 for world, out in outs.items())
    # every rank logs the same value: the one process's, each batch's float32 mean loss weighted by its
    # tokens and summed in float64 (two orders of 4 terms: within gamma_4(2**-53))
    assert rank0["val/loss"] == rank1["val/loss"]
    assert abs(rank0["val/loss"] - single["val/loss"]) <= gamma(4, 2.0**-53) * 2 * single["val/loss"]
    # the closed form: the mean of all 208 tokens' losses; the batches' float32 means are within
    # gamma_64(2**-24) of their tokens' exact mean (a float32 log-softmax adds a few ulps per token)
    assert abs(single["val/loss"] - single["closed_form"]) <= gamma(64 + 8) * single["closed_form"]
    assert single["val/ppl"] == pytest.approx(math.exp(single["val/loss"]), rel=4 * 2.0**-53)
    assert single["val/bits_per_byte"] == pytest.approx(single["val/loss"] / math.log(2), rel=2 * 2.0**-53)
