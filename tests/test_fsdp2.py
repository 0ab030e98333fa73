"""FSDP2MasterWeightPrecision under Lightning's ModelParallelStrategy on 2 CPU processes (gloo):
FP32 DTensor shards as masters, bf16 compute, skips decided on every rank together."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from conftest import TinyRegressor

SCRIPT = textwrap.dedent('''
    import json, sys
    import torch, lightning.pytorch as L
    from lightning.pytorch.strategies import FSDPStrategy, ModelParallelStrategy
    from torch.distributed.fsdp import FullyShardedDataParallel
    from torch.utils.data import DataLoader, Subset
    sys.path.insert(0, {tests!r})
    from conftest import TinyRegressor, regression_data
    from lightning_mp import precision_plugin
    from lightning_mp.parallel import exit_after_leaving, leave_process_group
    from lightning_mp.precision import FSDP2MasterWeightPrecision

    args = json.loads(sys.argv[1])

    class CPUFSDPStrategy(FSDPStrategy):
        """Test only: Lightning's FSDP (FSDP1) on CPU processes (its guard checks the exact type;
        torch needs device_id=cpu, which Lightning leaves out)."""

        def _setup_model(self, model):
            return FullyShardedDataParallel(model, mixed_precision=self.mixed_precision_config,
                                            device_id=torch.device("cpu"), **self.kwargs)

    def gather(value):  # a sharded state dict's entry, whole on rank 0
        if hasattr(value, "full_tensor"):
            return value.full_tensor()
        full = torch.empty(value.size()) if torch.distributed.get_rank() == 0 else None
        value.gather(dst=0, out=full)  # a ShardedTensor
        return full

    class Model(TinyRegressor):
        def configure_model(self):
            if args["strategy"] == "fsdp2" and args["precision"] == "32-true":  # Lightning's own, FP32 units
                from torch.distributed.fsdp import fully_shard
                for unit in (self.norm, self.inp, self.out, self):  # the units plugin.shard() makes
                    fully_shard(unit, mesh=self.device_mesh["data_parallel"])
            elif args["strategy"] == "fsdp2":
                self.trainer.precision_plugin.shard(self, self.device_mesh["data_parallel"],
                                                    blocks=[torch.nn.Linear])

        def forward(self, x):
            if args.get("fp32_compute"):  # under the plugin's autocast, too
                with torch.autocast("cpu", enabled=False):
                    return super().forward(x)
            return super().forward(x)

        def training_step(self, batch, batch_idx):
            loss = super().training_step(batch, batch_idx)
            nan = args.get("nan_at") == self.trainer.global_step and self.global_rank == 1  # every micro-batch of it
            return loss * float("nan") if nan else loss

    class Save(L.Callback):
        seen = {{}}

        def on_train_start(self, trainer, pl_module):
            for name in ("inp", "norm"):
                getattr(pl_module, name).register_forward_pre_hook(
                    lambda m, a, name=name: self.seen.setdefault(name, str(m.weight.dtype)) and None)

        def on_train_end(self, trainer, pl_module):
            state = {{n: (p.full_tensor() if hasattr(p, "full_tensor") else p).detach().float().clone()
                     for n, p in pl_module.named_parameters()}}
            if args["strategy"] == "fsdp2":  # the FP32 values, as checkpoints get them (bf16 shards: + storage)
                from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
                state = get_model_state_dict(pl_module, options=StateDictOptions(full_state_dict=True))  # on every rank
            if args["strategy"] == "ddp":  # our plugin's FP32 values of the bf16 weights
                store = trainer.precision_plugin.store
                state = {{n: store.value(p).clone() for n, p in pl_module.named_parameters()}}
            if args["strategy"] == "fsdp":  # sharded: torch's full state dict crashes on CPU (FlatParamHandle.to_cpu)
                state = {{k: gather(v) for k, v in trainer.strategy.lightning_module_state_dict().items()}}
                if trainer.global_rank:
                    return
            monitor = [c.last for c in trainer.callbacks if hasattr(c, "every_n_steps")]
            skipped = getattr(trainer.precision_plugin, "skipped_steps", 0)  # 0: Lightning's 32-true
            dtypes = {{n: str(p.dtype) for n, p in pl_module.named_parameters()}}  # as stored (the shards)
            torch.save({{"state": state, "skipped": skipped, "seen": self.seen, "dtypes": dtypes,
                        "lr": trainer.optimizers[0].param_groups[0]["lr"], "monitor": monitor}},
                       f"{{args['out']}}/rank{{trainer.global_rank}}.pt")

    if args["strategy"] == "fsdp2":
        strategy = ModelParallelStrategy(data_parallel_size=args.get("devices", 2), tensor_parallel_size=1,
                                         save_distributed_checkpoint=not args.get("full_checkpoint"))
        if args["precision"] == "32-true":
            from lightning.pytorch.plugins.precision import Precision
            plugin = Precision()
        else:
            keep = [lambda name, module: True] if args.get("fp32_compute") else None  # every unit FP32
            plugin = FSDP2MasterWeightPrecision(args["precision"], device=args.get("accelerator", "cpu"),
                                                master=args.get("master", "fp32"), keep_fp32=keep)
    elif args["strategy"] == "fsdp":
        from torch.distributed.fsdp.wrap import ModuleWrapPolicy
        strategy = CPUFSDPStrategy(auto_wrap_policy=ModuleWrapPolicy({{torch.nn.Linear}}), state_dict_type="sharded")
        plugin = precision_plugin(args["precision"], strategy="fsdp", device="cpu")
    else:
        strategy, plugin = "ddp", precision_plugin(args["precision"], grad_reduce_dtype="fp32")
    callbacks = [Save()]
    if args.get("monitor"):
        from lightning_mp import SwallowedUpdateMonitor
        callbacks.append(SwallowedUpdateMonitor(every_n_steps=1))
    if args.get("save_at"):  # a checkpoint during the run, as Lightning's ModelCheckpoint writes it
        from lightning.pytorch.callbacks import ModelCheckpoint
        callbacks.append(ModelCheckpoint(dirpath=args["out"], filename="{{step}}", auto_insert_metric_name=False,
                                         every_n_train_steps=args["save_at"], save_top_k=-1))
    trainer = L.Trainer(accelerator=args.get("accelerator", "cpu"), devices=args.get("devices", 2), strategy=strategy,
                        plugins=[plugin], max_steps=args["steps"],
                        use_distributed_sampler=False, callbacks=callbacks, logger=False,
                        enable_checkpointing=bool(args.get("save_at")), default_root_dir=args["out"],
                        enable_progress_bar=False,
                        enable_model_summary=False, gradient_clip_val=args.get("clip"),
                        accumulate_grad_batches=args.get("accumulate", 1))
    torch.manual_seed(0)
    model = Model(lr=1e-2, scheduler=True, optimizer=args.get("optimizer", "adamw"))
    dataset = regression_data(n=args.get("n", 64)).dataset
    mine = [i for i in range(len(dataset)) if (i // 8) % 2 == trainer.global_rank]
    trainer.fit(model, DataLoader(Subset(dataset, mine), batch_size=8), ckpt_path=args.get("resume"))
    leave_process_group()
    exit_after_leaving()  # (without the interpreter's teardown, where torch may abort)
''')


def run(tmp_path: Path, name: str, **args) -> list[dict]:
    out = tmp_path / name
    out.mkdir()
    script = tmp_path / "sharded_run.py"
    script.write_text(SCRIPT.format(tests=str(Path(__file__).parent)))
    result = subprocess.run([sys.executable, str(script), json.dumps({"out": str(out), "steps": 4, **args})],
                            cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return [torch.load(out / f"rank{r}.pt") for r in range(2) if (out / f"rank{r}.pt").exists()]


# One training setup for every 2-process run: clipping, a NaN on rank 1 at the second step, 2
# micro-batches per step of one batch of 8 per rank each (a step is one pass over the data, so a
# resume continues the same batches).
COMMON = dict(precision="bf16-master", optimizer="mp-adamw", clip=0.05, nan_at=1, accumulate=2, n=32)


@pytest.fixture(scope="module")
def fsdp2_fp32(tmp_path_factory):
    """The FP32-shard FSDP2 run, with the swallowed-update monitor and full checkpoints."""
    return run(tmp_path_factory.mktemp("fsdp2"), "fp32", strategy="fsdp2", master="fp32", monitor=True,
               full_checkpoint=True, **COMMON)


@pytest.mark.slow
def test_fsdp2_and_fsdp1_train_fp32_shards_as_ddp_does_and_skip_on_both_ranks(fsdp2_fp32, tmp_path):
    """FSDP2 (ModelParallelStrategy) and FSDP1 (Lightning's FSDPStrategy, through a test-only
    subclass that runs it on CPU) against DDP with our plugin reducing in FP32, on the same global
    batches. The per-rank bf16 gradients agree only to rounding (a near-zero one can change sign,
    and Adam's first step moves its weight by +-lr either way), so the updates are compared, not
    the bits."""
    ddp = run(tmp_path, "ddp", strategy="ddp", **COMMON)
    torch.manual_seed(0)
    start = TinyRegressor(lr=1e-2).state_dict()
    for kind in ("fsdp2", "fsdp"):
        sharded = fsdp2_fp32 if kind == "fsdp2" else run(tmp_path, kind, strategy=kind, **COMMON)
        assert sharded[0]["skipped"] == 1 == ddp[0]["skipped"] == ddp[1]["skipped"], kind  # a NaN on rank 1 skips both
        assert sharded[0]["lr"] == ddp[0]["lr"], kind  # the step scheduler held on the skipped step, as under DDP
        if kind == "fsdp2":  # 16-bit compute (all-gathered bf16 parameters), norms in FP32
            assert sharded[0]["seen"] == {"inp": "torch.bfloat16", "norm": "torch.float32"}
        for key, theirs in ddp[0]["state"].items():
            ours = sharded[0]["state"][key]
            if kind == "fsdp2":
                assert sharded[1]["skipped"] == 1 and torch.equal(ours, sharded[1]["state"][key]), key  # one model
            assert ours.dtype == torch.float32 and torch.isfinite(ours).all(), (kind, key)
            moved, expected = ours - start[key], theirs - start[key]
            assert expected.abs().max() > 1e-3, key  # it trained
            agree = ((moved - expected).abs() <= 1e-3).float().mean()  # a tenth of an Adam step at lr 1e-2
            assert agree >= 0.9, (kind, key, agree)  # all but sign flips of near-zero bf16 gradients


@pytest.mark.slow
def test_fsdp2_plugin_with_fp32_compute_trains_as_lightnings_32_true_fsdp2_bit_for_bit(tmp_path):
    """With every unit kept FP32 and the forward under no autocast, the plugin's step (the skip
    flag all-reduced over the ranks, the held schedulers, clipping by the global norm of DTensor
    gradients, accumulation, gradients freed after the step) is the same arithmetic as
    Lightning's 32-true FSDP2 run with the same units and optimizer: equal bit for bit."""
    common = dict(COMMON, strategy="fsdp2", optimizer="adamw", fp32_compute=True, nan_at=None)
    ours = run(tmp_path, "ours", **common)
    lightnings = run(tmp_path, "lightning", **{**common, "precision": "32-true"})
    torch.manual_seed(0)
    start = TinyRegressor(lr=1e-2).state_dict()
    assert ours[0]["seen"] == lightnings[0]["seen"] == {"inp": "torch.float32", "norm": "torch.float32"}
    assert ours[0]["skipped"] == 0 and ours[0]["lr"] == lightnings[0]["lr"]
    for key, expected in lightnings[0]["state"].items():
        assert (expected - start[key]).abs().max() > 1e-3, key  # it trained
        assert torch.equal(ours[0]["state"][key], expected) and torch.equal(ours[1]["state"][key], expected), key


@pytest.mark.slow
def test_fsdp2_bf16_shards_with_remainders_train_as_fp32_shards_bit_for_bit_and_resume_exactly(fsdp2_fp32, tmp_path):
    """``master="remainder"``: bf16 shards plus int16 remainders hold the FP32 values exactly, and
    the step uses FSDP2's FP32 reduce-scatter output (not its bf16 rounding), so the run equals
    the FP32-shard run bit for bit. Resumed from its full checkpoint of step 2, it ends equal too."""
    common = dict(strategy="fsdp2", master="remainder", full_checkpoint=True, **COMMON)
    remainder = run(tmp_path, "remainder", save_at=2, monitor=True, **common)
    checkpoint = tmp_path / "remainder" / "2.ckpt"
    resumed = run(tmp_path, "resumed", resume=str(checkpoint), **common)
    fp32 = fsdp2_fp32
    torch.manual_seed(0)
    start = TinyRegressor(lr=1e-2).state_dict()
    assert remainder[0]["seen"] == {"inp": "torch.bfloat16", "norm": "torch.float32"}
    assert fp32[0]["skipped"] == remainder[0]["skipped"] == resumed[0]["skipped"] == 1
    # the swallowed-update monitor counts each rank's shards and sums the counts over the ranks
    for rank in (0, 1):
        for key in ("precision/swallowed_frac", "precision/swallowed_without_masters"):
            assert remainder[rank]["monitor"][0][key] == fp32[rank]["monitor"][0][key] == fp32[0]["monitor"][0][key]
        assert remainder[rank]["monitor"][0]["precision/swallowed_frac"] == 0.0  # the FP32 values keep every update
    assert fp32[0]["monitor"][0]["precision/swallowed_without_masters"] > 0  # a bf16 copy would lose some
    for key, expected in fp32[0]["state"].items():
        assert (expected - start[key]).abs().max() > 1e-3, key  # it trained
        assert torch.equal(remainder[0]["state"][key], expected), key
        assert torch.equal(resumed[0]["state"][key], expected), key
    saved = torch.load(checkpoint, map_location="cpu", weights_only=False)["state_dict"]
    assert all(v.dtype == torch.float32 for v in saved.values())  # the FP32 values, not the bf16 shards
    plain = TinyRegressor()
    plain.load_state_dict(saved)
    assert any(not torch.equal(v, v.bfloat16().float()) for v in saved.values())  # low bits a bf16 model lacks


@pytest.mark.slow
def test_fsdp2_stochastic_shards_resume_from_a_distributed_checkpoint_bit_exactly(tmp_path):
    """Stochastic rounding's noise counter travels in the plugin's state (torch's sharded optimizer
    state dicts keep only "state" and "param_groups"): resumed from a DCP checkpoint directory,
    the run draws the noise the straight run drew."""
    common = dict(strategy="fsdp2", master="stochastic", **COMMON)
    straight = run(tmp_path, "straight", save_at=2, **common)
    checkpoint = tmp_path / "straight" / "2.ckpt"
    assert checkpoint.is_dir() and (checkpoint / "meta.pt").is_file()  # distributed: a directory of shards
    resumed = run(tmp_path, "resumed", resume=str(checkpoint), **common)
    for key, expected in straight[0]["state"].items():
        assert torch.equal(resumed[0]["state"][key], expected), key


@pytest.mark.slow
def test_fsdp2_8bit_moments_on_remainder_shards_resume_from_a_distributed_checkpoint_bit_exactly(tmp_path):
    """8-bit moments on each rank's shards (blocks cut from a shard's first element): the DCP
    checkpoint holds them decoded, as FP32 DTensors, which encode back to the same codes and
    scales; the resumed run ends bit for bit as the straight one."""
    common = dict(COMMON, strategy="fsdp2", master="remainder", optimizer="mp-adamw-8bit")
    straight = run(tmp_path, "straight", save_at=2, **common)
    torch.manual_seed(0)
    start = TinyRegressor(lr=1e-2).state_dict()
    assert straight[0]["skipped"] == 1
    resumed = run(tmp_path, "resumed", resume=str(tmp_path / "straight" / "2.ckpt"), **common)
    for key, expected in straight[0]["state"].items():
        assert (expected - start[key]).abs().max() > 1e-3, key  # it trained
        assert torch.equal(resumed[0]["state"][key], expected), key


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_fsdp2_on_a_gpu_remainder_shards_train_as_fp32_shards_bit_for_bit(tmp_path):
    """The CUDA path (NCCL, CUDA streams around the FP32 gradient shards) on one GPU, with the
    optimizer's foreach ops (the same ops for both storages)."""
    common = dict(COMMON, strategy="fsdp2", accelerator="cuda", devices=1, optimizer="mp-adamw-eager")
    fp32 = run(tmp_path, "fp32", master="fp32", **common)
    remainder = run(tmp_path, "remainder", master="remainder", **common)
    assert remainder[0]["seen"] == {"inp": "torch.bfloat16", "norm": "torch.float32"}
    for key, expected in fp32[0]["state"].items():
        assert torch.equal(remainder[0]["state"][key].cpu(), expected.cpu()), key


@pytest.fixture
def one_rank(tmp_path):
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'rendezvous'}", rank=0, world_size=1)
    yield init_device_mesh("cpu", (1,))
    dist.destroy_process_group()


def test_unsharded_models_and_contradicting_policies_are_refused(one_rank):
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    from lightning_mp.precision import FSDP2MasterWeightPrecision

    plugin = FSDP2MasterWeightPrecision("bf16-master", device="cpu", master="fp32")  # FP32 shards
    with pytest.raises(ValueError, match="needs a model sharded in configure_model"):
        plugin.convert_module(TinyRegressor())
    fp16 = TinyRegressor()
    fully_shard(fp16, mesh=one_rank, mp_policy=MixedPrecisionPolicy(param_dtype=torch.float16))
    with pytest.raises(ValueError, match=r"param_dtype=torch.float16.*contradicts bf16-master"):
        plugin.convert_module(fp16)
    model = TinyRegressor()
    plugin.shard(model, one_rank, blocks=[torch.nn.Linear])
    assert plugin.convert_module(model) is model
    x = torch.randn(4, 8)
    with plugin.forward_context():
        assert model(x).dtype == torch.bfloat16  # the output Linear computes in bf16
    assert all(p.dtype == torch.float32 for p in model.parameters())  # the FP32 shards are the masters

    with pytest.raises(ValueError, match="stores bfloat16 shards"):
        FSDP2MasterWeightPrecision("16-master", master="remainder")
    with pytest.raises(ValueError, match="max_consecutive_skips must be >= 1"):
        FSDP2MasterWeightPrecision("bf16-master", max_consecutive_skips=0)
    torch.manual_seed(0)
    bf16 = TinyRegressor()
    init = {k: v.clone() for k, v in bf16.state_dict().items()}
    remainder = FSDP2MasterWeightPrecision("bf16-master", device="cpu", master="remainder")
    remainder.shard(bf16, one_rank, blocks=[torch.nn.Linear])
    assert remainder.convert_module(bf16) is bf16
    assert {n: str(p.dtype) for n, p in bf16.named_parameters()} == {
        "inp.weight": "torch.bfloat16", "inp.bias": "torch.bfloat16", "norm.weight": "torch.float32",
        "norm.bias": "torch.float32", "out.weight": "torch.bfloat16", "out.bias": "torch.bfloat16"}
    for key, value in bf16.state_dict().items():  # the exact FP32 initialization, kept beside the bf16 shards
        assert value.dtype == torch.float32 and torch.equal(value.full_tensor(), init[key]), key
    with pytest.raises(TypeError, match=r"torch's AdamW, Adam or SGD \(not torch.optim.adagrad.Adagrad.*master='fp32'"):
        remainder.connect(bf16, [torch.optim.Adagrad(bf16.parameters())], [])  # torch's AdamW is adopted


def test_lightning_mp_optim_steps_fsdp2_shards_as_torch_steps_whole_tensors(one_rank):
    """lightning_mp.optim.AdamW on FP32 DTensor shards (its fused kernel on each local shard) against
    torch's AdamW on the unsharded model, both fed the same gradients each step: equal within the
    round-off of two FP32 AdamW implementations (roundoff.adamw_bound; the kernel takes IEEE square
    roots, torch's vector sqrt may be 1 ulp off, and FMA use differs between CPUs)."""
    from roundoff import adamw_bound, assert_within
    from torch.distributed.fsdp import fully_shard

    import lightning_mp

    torch.manual_seed(0)
    whole = TinyRegressor()
    sharded = TinyRegressor()
    start = {k: v.clone() for k, v in whole.state_dict().items()}
    sharded.load_state_dict(start)
    fully_shard(sharded, mesh=one_rank)
    ours = lightning_mp.optim.AdamW(sharded.parameters(), lr=1e-2, weight_decay=0.1)
    theirs = torch.optim.AdamW(whole.parameters(), lr=1e-2, weight_decay=0.1)
    history = {name: ([], []) for name in start}  # each step's gradient and value before it
    for _ in range(3):
        torch.nn.functional.mse_loss(whole(torch.randn(16, 8)), torch.randn(16, 1)).backward()
        for (name, p), q in zip(sharded.named_parameters(), whole.parameters()):
            p.grad = torch.distributed.tensor.distribute_tensor(q.grad, one_rank, p.placements)  # one rank: whole
            history[name][0].append(q.grad.clone())
            history[name][1].append(q.detach().clone())
        for optimizer in (ours, theirs):
            optimizer.step()
            optimizer.zero_grad()
    for (name, p), q in zip(sharded.named_parameters(), whole.parameters()):
        assert type(p).__name__ == "DTensor"
        grads, values = history[name]
        assert_within(p.full_tensor(), q.detach(), adamw_bound(grads, values, lr=1e-2, weight_decay=0.1), name)
        assert (q.detach() - start[name]).abs().max() > 1e-3, name  # it trained


@pytest.mark.slow
def test_trainer_fsdp2_runs_the_default_recipe_on_two_processes_and_resumes_as_one_run(tmp_path):
    from lightning_mp import MoEModule

    exe = Path(sys.executable).parent / "lightning-mp-train"
    common = ["trainer=fsdp2", "trainer.accelerator=cpu", "trainer.devices=2", "trainer.val_check_interval=2",
              "trainer.limit_val_batches=1", "data.max_bytes=100000"]

    def train(*args):
        result = subprocess.run([str(exe), *common, *args], cwd=tmp_path, capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, result.stderr[-3000:]
        run = (tmp_path / "outputs" / "tiny" / "latest").resolve()
        return run, json.loads((run / "summary.json").read_text())

    straight_dir, straight = train("trainer.max_steps=4", "callbacks.checkpoint.save_top_k=-1")  # keeps step 2's
    _, resumed = train("trainer.max_steps=4", f"ckpt_path={straight_dir / 'checkpoints' / 'best-step=2.ckpt'}")
    assert resumed["resumed_from"].endswith("best-step=2.ckpt")  # steps 3 and 4 only
    assert resumed["steps"] == 4 and resumed["val_loss"] == straight["val_loss"]
    assert resumed["train_loss"] == straight["train_loss"]
    # bytes per parameter per rank: FP32 shards + AdamW's moments over 2 ranks (grads freed by then)
    assert straight["bytes_per_param"] == pytest.approx(12 / 2, abs=0.01)
    checkpoint = torch.load(straight_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    state = checkpoint["state_dict"]
    assert all(v.dtype == torch.float32 and type(v) is torch.Tensor for v in state.values() if v.is_floating_point())
    plain = MoEModule(**{k: v for k, v in checkpoint["hyper_parameters"].items()})
    plain.configure_model()
    plain.load_state_dict(state)  # a plain FP32 model, unsharded


def test_autocast_device_is_the_runs_not_the_machines(one_rank, monkeypatch):
    """On a GPU machine a CPU run (a CPU mesh) still autocasts the CPU: the device comes from the mesh."""
    from lightning_mp.precision import FSDP2MasterWeightPrecision

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # a GPU machine, as far as the plugin asks
    plugin = FSDP2MasterWeightPrecision("bf16-master")
    model = TinyRegressor()
    plugin.shard(model, one_rank)
    plugin.convert_module(model)
    with plugin.forward_context():
        assert torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16
        assert model(torch.randn(2, 8)).dtype == torch.bfloat16  # computed in bf16, not silently FP32


@pytest.mark.slow
def test_fsdp2_default_keeps_bf16_shards_with_remainders_for_torchs_own_adamw(fsdp2_fp32, tmp_path):
    """The default storage under FSDP2: the user's torch AdamW is adopted and steps bf16 shards with
    int16 remainders, the same arithmetic as lightning_mp's AdamW on FP32 shards, bit for bit."""
    auto = run(tmp_path, "auto", strategy="fsdp2", **{**COMMON, "master": "auto", "optimizer": "adamw"})
    assert auto[0]["dtypes"]["inp.weight"] == "torch.bfloat16" and auto[0]["dtypes"]["norm.weight"] == "torch.float32"
    assert fsdp2_fp32[0]["dtypes"]["inp.weight"] == "torch.float32"  # master="fp32": FP32 shards
    for key, expected in fsdp2_fp32[0]["state"].items():
        assert torch.equal(auto[0]["state"][key], expected) and torch.equal(auto[1]["state"][key], expected), key


@pytest.mark.parametrize("master", ["fp32", "remainder"])
def test_kept_modules_meet_16_bit_callers_outside_autocast_as_on_one_device(one_rank, master):
    """A Llama sharded by the plugin and called outside autocast (a `generate` in a hook): its
    RMSNorm's FP32 output reached the bf16 q_proj and failed. Now the logits are bf16 and equal
    the unsharded plugin's, bit for bit (the same casts, one rank)."""
    import copy

    from lightning_mp import MasterWeightPrecision
    from lightning_mp.precision import FSDP2MasterWeightPrecision

    transformers = pytest.importorskip("transformers")
    layer = transformers.models.llama.modeling_llama.LlamaDecoderLayer
    torch.manual_seed(0)
    sharded = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2))
    for norm in (m for m in sharded.modules() if type(m).__name__ == "LlamaRMSNorm"):
        torch.nn.init.uniform_(norm.weight, 0.5, 1.5)  # not ones: a norm's rounding shows
    whole = copy.deepcopy(sharded)
    FSDP2MasterWeightPrecision("bf16-master", device="cpu", master=master).shard(sharded, one_rank, blocks=[layer])
    MasterWeightPrecision("bf16-master", master=master).convert_module(whole)
    ids = torch.randint(0, 64, (2, 8))
    logits = sharded(input_ids=ids).logits
    assert logits.dtype == torch.bfloat16 and torch.equal(logits, whole(input_ids=ids).logits)


def test_a_hook_on_gradients_is_warned_that_bf16_shards_hold_theirs_apart(tmp_path):
    """Under bf16 shards (the default for torch's AdamW) the FP32 gradients are held apart: an
    on_before_optimizer_step that clips ``self.parameters()`` would silently miss them; it is told
    so, once, with the ways that work (one process, ModelParallelStrategy)."""
    script = textwrap.dedent(f'''
        import sys, warnings, torch, lightning.pytorch as L
        sys.path.insert(0, {str(Path(__file__).parent)!r})
        from conftest import TinyRegressor, regression_data
        from lightning.pytorch.strategies import ModelParallelStrategy
        warnings.simplefilter("always")  # a warning each time one is given
        from lightning_mp.precision import FSDP2MasterWeightPrecision

        class Model(TinyRegressor):
            def configure_model(self):
                self.trainer.precision_plugin.shard(self, self.device_mesh["data_parallel"], blocks=[torch.nn.Linear])

            def on_before_optimizer_step(self, optimizer):
                torch.nn.utils.clip_grad_norm_(self.parameters(), 1.0)

        t = L.Trainer(accelerator="cpu", devices=1, strategy=ModelParallelStrategy(1, 1), max_steps=2, logger=False,
                      plugins=[FSDP2MasterWeightPrecision("bf16-master", device="cpu")], enable_checkpointing=False,
                      enable_progress_bar=False, enable_model_summary=False, default_root_dir={str(tmp_path)!r})
        t.fit(Model(lr=1e-2, optimizer="adamw"), torch.utils.data.DataLoader(regression_data(n=16).dataset, batch_size=8))
        print("first run done", file=sys.stderr)

        from lightning_mp import ByteTextDataModule, MoEModule  # its own hook touches no gradient: no warning
        t = L.Trainer(accelerator="cpu", devices=1, strategy=ModelParallelStrategy(1, 1), max_steps=1, logger=False,
                      plugins=[FSDP2MasterWeightPrecision("bf16-master", device="cpu")], enable_checkpointing=False,
                      enable_progress_bar=False, enable_model_summary=False, default_root_dir={str(tmp_path)!r},
                      limit_val_batches=0)
        moe = MoEModule(d_model=32, n_layers=1, n_heads=4, n_experts=4, d_ff=64, max_seq_len=16)
        t.fit(moe, ByteTextDataModule(seq_len=16, batch_size=4, max_bytes=20_000))
        assert t.precision_plugin.grads is not None  # bf16 shards: FP32 gradients held apart
    ''')
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    first, moe = out.stderr.split("first run done")
    assert first.count("in on_before_optimizer_step their .grad is None; clip with gradient_clip_val") == 1
    assert "their .grad is None" not in moe
