"""lightning_mp.Fabric and lightning_mp.fabric.MasterWeightPrecision: hand-written loops, through a real Fabric.

Most runs use a loss whose gradients do not depend on the weights and are exact in 16 bits
(``loss = sum_p (p * r_p).sum()`` with ``r_p`` small multiples of 1/4): a 16-bit run then gets the
very gradients of a ``32-true`` run, and an optimizer whose arithmetic is torch's (SGD, or AdamW
on FP32 masters) must end bit for bit where ``32-true`` ends.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import lightning as L
import pytest
import torch
from torch import nn

import lightning_mp
from lightning_mp import memory_audit
from lightning_mp.fabric import MasterWeightPrecision
from conftest import clip_max
from roundoff import adamw_bound, assert_within


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.inp = nn.Linear(8, 16)
        self.norm = nn.LayerNorm(16)
        self.out = nn.Linear(16, 4)

    def forward(self, x):
        return self.out(nn.functional.gelu(self.norm(self.inp(x))))


def coefficients(model):
    g = torch.Generator().manual_seed(1)
    return {n: torch.randint(-8, 9, p.shape, generator=g).float() / 4 for n, p in model.named_parameters()}


def linear_loss(model, r, scale=1.0):
    """Gradients r * scale whatever the weights (exact in bf16 and fp16 for these r)."""
    return sum((p.float() * r[n]).sum() for n, p in model.module.named_parameters()) * scale  # (Fabric's wrapper)


def make_optimizer(name, params):
    if name == "sgd":
        return torch.optim.SGD(params, lr=1e-2, momentum=0.9)
    return torch.optim.AdamW(params, lr=1e-2, weight_decay=0.1)


def fabric_for(precision, **options):
    if precision in ("32-true", "bf16-true", "16-true"):
        return L.Fabric(accelerator="cpu", devices=1, precision=precision)
    if options:  # the plugin object with options, inside a plain lightning.Fabric
        return L.Fabric(accelerator="cpu", devices=1, plugins=[MasterWeightPrecision(precision, **options)])
    return lightning_mp.Fabric(accelerator="cpu", devices=1, precision=precision)


def values(fabric, model):
    """Each parameter's FP32 value as the run holds it: ``state_dict()`` gives them under *-master."""
    return {k: v.float().clone() for k, v in model.state_dict().items()}


def train(precision, optimizer="sgd", steps=4, accumulate=1, clip=None, spike_at=None, scheduler=False, **options):
    torch.manual_seed(0)
    fabric = fabric_for(precision, **options)
    model = Net()
    r = coefficients(model)
    model, opt = fabric.setup(model, make_optimizer(optimizer, model.parameters()))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda t: 1 / (1 + t)) if scheduler else None
    lrs = []
    for step in range(steps):
        for micro in range(accumulate):
            with fabric.no_backward_sync(model, enabled=micro < accumulate - 1):
                scale = float("inf") if step == spike_at else 1.0 + micro
                fabric.backward(linear_loss(model, r, scale))
        if clip is not None:
            kind, value = clip
            fabric.clip_gradients(model, opt, **{kind: value})
        opt.step()
        opt.zero_grad()
        if sched is not None:
            sched.step()
        lrs.append(opt.param_groups[0]["lr"])
    return fabric, model, opt, lrs


def assert_equal(a, b):
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_the_closed_form_trap_bf16_true_frozen_and_bf16_master_as_32_true():
    """SGD at lr 1e-3 on gradients of 1: each update is 1e-3, below half a bf16 step at 1.0 (2**-8)."""
    results = {}
    for precision in ("32-true", "bf16-true", "bf16-master"):
        fabric = fabric_for(precision)
        with fabric.init_module():
            model = nn.Linear(4, 1, bias=False)
        nn.init.ones_(model.weight)
        model, opt = fabric.setup(model, torch.optim.SGD(model.parameters(), lr=1e-3))
        for _ in range(10):
            fabric.backward(model(torch.ones(1, 4)).sum())
            opt.step()
            opt.zero_grad()
        results[precision] = model.state_dict()["weight"].float()
    assert torch.equal(results["bf16-true"], torch.ones(1, 4))  # every update rounded away
    assert torch.equal(results["bf16-master"], results["32-true"])
    assert torch.allclose(results["32-true"], torch.full((1, 4), 0.99), atol=1e-6)


@pytest.mark.parametrize("precision, options", [("bf16-master", {"master": "fp32"}), ("16-master", {"init_scale": 2.0**8}),
                                                ("bf16-master", {})])
def test_a_weight_written_between_steps_trains_on_from_it(precision, options):
    """SGD updates of 2**-12 (gradients 0.5, below half a bf16 step at 1.0); before the fourth step
    the loop writes one element in place, as a weight clip or a reset does. Under FP32 masters the
    step used to write the old master back over it; now the element goes on from what was written
    and the others from their FP32 values, as under 32-true."""
    results = {}
    for name in ("32-true", precision):
        fabric = fabric_for(name, **(options if name == precision else {}))
        model = nn.Linear(4, 1, bias=False)
        nn.init.ones_(model.weight)
        model, opt = fabric.setup(model, torch.optim.SGD(model.parameters(), lr=2.0**-11))
        for step in range(6):
            if step == 3:
                with torch.no_grad():
                    model.module.weight[0, 0] = 0.375
            fabric.backward(model(torch.full((1, 4), 0.5)).sum())
            opt.step()
            opt.zero_grad()
        results[name] = model.state_dict()["weight"].float()
    assert torch.equal(results["32-true"], torch.tensor([[0.375 - 3 * 2.0**-12] + [1 - 6 * 2.0**-12] * 3]))
    if options:  # FP32 masters
        assert torch.equal(results[precision], results["32-true"])
    else:  # int16 remainders cannot tell which elements changed: the others round to 16 bits once (to 1.0)
        assert torch.equal(results[precision], torch.tensor([[0.375 - 3 * 2.0**-12] + [1 - 3 * 2.0**-12] * 3]))


def test_the_store_is_found_through_fabrics_wrapper_and_clips_as_32_true():
    """``MasterStore.of(model)`` on what ``fabric.setup`` returns (and on a ``torch.compile`` of it):
    the clip through the store after every step (docs/storage.md) ends bit for bit where 32-true's
    ``clamp_`` ends. SGD updates of 2**-12 from (1, 0.75, 0.75, 0.75); the clip at 1 + 2.5 * 2**-12
    binds on the first element from the third step."""
    c = 1 + 2.5 * 2.0**-12
    want = torch.tensor([[c] + [0.75 + 6 * 2.0**-12] * 3])
    for name in ("32-true", "bf16-master"):
        fabric = fabric_for(name)
        model = nn.Linear(4, 1, bias=False)
        with torch.no_grad():
            model.weight.copy_(torch.tensor([[1.0, 0.75, 0.75, 0.75]]))
        model, opt = fabric.setup(model, torch.optim.SGD(model.parameters(), lr=2.0**-11))
        store = lightning_mp.MasterStore.of(model)
        assert (store is None) == (name == "32-true")
        for _ in range(6):
            fabric.backward(model(torch.full((1, 4), -0.5)).sum())
            opt.step()
            opt.zero_grad()
            clip_max(model, model.module.weight, c)  # MasterStore.of(model): through Fabric's wrapper
        assert torch.equal(model.state_dict()["weight"].float(), want), name
    assert lightning_mp.MasterStore.of(torch.compile(model)) is store
    store.restore_fp32()  # through the wrapper too: the module itself turns FP32, with the exact values
    assert model.module.weight.dtype == torch.float32 and torch.equal(model.module.weight.detach(), want)


@pytest.mark.parametrize("optimizer, options", [("sgd", {}), ("adamw", {"master": "fp32"})])
def test_bf16_master_trains_as_32_true_bit_for_bit(optimizer, options):
    fabric, model, opt, _ = train("bf16-master", optimizer, **options)
    assert {p.dtype for n, p in model.named_parameters() if "norm" not in n} == {torch.bfloat16}
    reference = train("32-true", optimizer)
    assert_equal(values(fabric, model), values(*reference[:2]))
    theirs = reference[2].state_dict()["state"][0]
    ours = opt.state_dict()["state"][0]  # torch's keys (and the remainder, under the default storage)
    assert all(torch.equal(ours[k], theirs[k]) for k in theirs)


def test_the_default_adopts_torch_adamw_and_tracks_32_true_to_its_rounding():
    """Under ``master="auto"`` torch's AdamW steps int16 remainders through the fused kernel, whose
    IEEE square root may differ from torch's by an ulp: the runs differ by AdamW's round-off alone
    (roundoff.adamw_bound: the same gradients r every step; with a constant gradient each update
    is at most lr (1 + weight decay), so |p| before any of the 4 steps is within 0.05 of its end)."""
    fabric, model, opt, _ = train("bf16-master", "adamw")
    assert isinstance(opt.optimizer, torch.optim.AdamW) and "remainder" in opt.optimizer.state[model.inp.weight]
    ours, ref = values(fabric, model), values(*train("32-true", "adamw")[:2])
    r = coefficients(Net())
    for key in ours:
        bound = adamw_bound([r[key]] * 4, [ref[key].abs() + 0.05] * 4, lr=1e-2, weight_decay=0.1)
        assert_within(ours[key], ref[key], bound, key)


@pytest.mark.parametrize("precision, options", [("bf16-master", {}), ("16-master", {"init_scale": 2.0**8})])
@pytest.mark.parametrize("clip", [("max_norm", 3.0), ("clip_val", 0.5)])
def test_clipping_is_32_true_clipping_on_unscaled_fp32_gradients(precision, options, clip):
    fabric, model, *_ = train(precision, "sgd", clip=clip, **options)
    assert_equal(values(fabric, model), values(*train("32-true", "sgd", clip=clip)[:2]))


def test_accumulated_micro_batches_are_summed_in_fp32():
    fabric, model, *_ = train("bf16-master", "sgd", accumulate=3)
    assert_equal(values(fabric, model), values(*train("32-true", "sgd", accumulate=3)[:2]))


def test_a_gradient_changed_by_hand_between_backward_and_step_is_warned_when_micro_batches_were_summed_apart():
    # torch's clip_grad_norm_ on model.parameters() after the last backward sees that micro-batch's
    # 16-bit gradient only (the earlier ones are in an FP32 sum): under 32-true it clips the whole
    # gradient. It cannot be undone at the step, so it is said, once; fabric.clip_gradients is exact.
    def run(clip):
        torch.manual_seed(0)
        fabric = lightning_mp.Fabric(accelerator="cpu", devices=1, precision="bf16-master")
        net = Net()
        model, opt = fabric.setup(net, torch.optim.SGD(net.parameters(), lr=1e-2))
        for micro in range(2):
            with fabric.no_backward_sync(model, enabled=micro == 0):
                fabric.backward(model(torch.randn(4, 8)).pow(2).mean())
        clip(fabric, model, opt)
        opt.step()

    with pytest.warns(UserWarning, match=r"changed after its backward .* not to the sum of all as under 32-true"):
        run(lambda fabric, model, opt: torch.nn.utils.clip_grad_norm_(model.parameters(), 0.1))
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*changed after its backward.*")
        run(lambda fabric, model, opt: fabric.clip_gradients(model, opt, max_norm=0.1))
        run(lambda fabric, model, opt: None)


def test_an_overflowing_16_master_step_is_skipped_whole():
    options = dict(init_scale=2.0**8, hysteresis=1)
    fabric, model, opt, lrs = train("16-master", "sgd", steps=3, spike_at=1, scheduler=True, **options)
    plugin = fabric.strategy.precision
    assert plugin.skipped_steps == 1 and plugin.scaler.scale == 2.0**7  # backed off once
    clean, model2, opt2, lrs2 = train("16-master", "sgd", steps=2, scheduler=True, **options)
    assert_equal(values(fabric, model), values(clean, model2))  # the skipped step changed no weight
    assert torch.equal(opt.state_dict()["state"][0]["momentum_buffer"], opt2.state_dict()["state"][0]["momentum_buffer"])
    assert lrs == [lrs2[0], lrs2[0], lrs2[1]]  # the schedule held on the skipped step


def test_fabric_save_holds_fp32_values_and_resumes_bit_exactly(tmp_path):
    def run(steps, save_at=None, load=None):
        torch.manual_seed(0)
        plugin = MasterWeightPrecision("16-master", init_scale=2.0**8, hysteresis=1)
        fabric = lightning_mp.Fabric(accelerator="cpu", devices=1, plugins=[plugin])
        model = Net()
        r = coefficients(model)
        model, opt = fabric.setup(model, torch.optim.AdamW(model.parameters(), lr=1e-2))
        start = 0
        if load:
            start = fabric.load(load, {"model": model, "optimizer": opt})["step"]
        for step in range(start, steps):
            fabric.backward(linear_loss(model, r, float("inf") if step == 1 else 1.0))  # one skip, before the save
            opt.step()
            opt.zero_grad()
            if step + 1 == save_at:
                fabric.save(tmp_path / "ckpt.pt", {"model": model, "optimizer": opt, "step": step + 1})
        return fabric, model, opt

    straight = run(5, save_at=3)
    saved = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    assert all(v.dtype == torch.float32 for v in saved["model"].values())
    plain = Net()
    plain.load_state_dict(saved["model"])  # a plain FP32 model takes the file as it is
    assert saved["lightning_mp_precision"]["skipped_steps"] == 1
    resumed = run(5, load=tmp_path / "ckpt.pt")
    assert resumed[0].strategy.precision.scaler.scale == straight[0].strategy.precision.scaler.scale
    assert_equal(values(*straight[:2]), values(*resumed[:2]))
    for a, b in zip(straight[2].state_dict()["state"].values(), resumed[2].state_dict()["state"].values()):
        assert all(torch.equal(a[k], b[k]) for k in a)


def test_plain_fabric_save_with_the_plugin_in_the_state(tmp_path):
    fabric, model, opt, _ = train("16-master", "sgd", steps=3, spike_at=1, init_scale=2.0**8, hysteresis=1)
    fabric.save(tmp_path / "c.pt", {"model": model, "optimizer": opt, "precision": fabric.strategy.precision})
    other = fabric_for("16-master", init_scale=2.0**8, hysteresis=1)
    m2, o2 = other.setup(Net(), torch.optim.SGD(Net().parameters(), lr=1e-2))
    other.load(tmp_path / "c.pt", {"model": m2, "precision": other.strategy.precision}, strict=False)
    assert other.strategy.precision.skipped_steps == 1 and other.strategy.precision.scaler.scale == 2.0**7
    assert_equal(values(other, m2), values(fabric, model))


def test_init_module_empty_init_then_loaded_weights_keep_their_fp32_values(tmp_path):
    torch.manual_seed(0)
    reference = Net()
    state = {k: v + 1e-3 for k, v in reference.state_dict().items()}  # values bf16 cannot hold
    fabric = lightning_mp.Fabric(accelerator="cpu", devices=1, precision="bf16-master")
    with fabric.init_module(empty_init=True):
        model = Net()
    model = fabric.setup(model)
    model.load_state_dict(state)
    assert_equal(values(fabric, model), state)
    torch.save(state, tmp_path / "raw.pt")
    model2 = fabric.setup(Net())
    fabric.load_raw(tmp_path / "raw.pt", model2)
    assert_equal(values(fabric, model2), state)


@pytest.mark.parametrize("precision, dtype", [("bf16-master", torch.bfloat16), ("16-master", torch.float16)])
def test_a_frozen_base_loaded_after_setup_keeps_no_storage_as_litgpt_finetune_lora_loads_it(precision, dtype, tmp_path):
    """A LoRA-style fine-tune: the base frozen before setup, its 16-bit checkpoint loaded after it,
    the optimizer given every parameter (litgpt's ``finetune_lora``), a small adapter trained. The
    base's values are 16-bit numbers: its weights hold them, with nothing beside them; the adapter
    gets remainders (bf16) or FP32 masters (fp16); ``fabric.save`` holds the base's values exactly."""
    torch.manual_seed(0)
    base = {k: v.to(dtype) for k, v in Net().state_dict().items()}  # a 16-bit checkpoint
    torch.save(base, tmp_path / "base.pt")
    fabric = lightning_mp.Fabric(accelerator="cpu", devices=1, precision=precision)
    with fabric.init_module(empty_init=False):
        model = nn.Sequential(Net(), nn.Linear(4, 4))
    model[0].requires_grad_(False)
    model = fabric.setup_module(model)
    model.module[0].load_state_dict(torch.load(tmp_path / "base.pt", weights_only=True))
    optimizer = fabric.setup_optimizers(torch.optim.AdamW(model.parameters(), lr=1e-2))
    for _ in range(3):
        fabric.backward(model(torch.randn(8, 8)).pow(2).mean())
        optimizer.step()
        optimizer.zero_grad()
    audit = memory_audit(model, [optimizer], fabric.strategy.precision)
    per_element = 2 if dtype == torch.bfloat16 else 4
    assert audit["masters"] == per_element * (4 * 4 + 4)  # the adapter's; the base's 16-bit Linears none
    fabric.save(tmp_path / "ckpt.pt", {"model": model})
    saved = torch.load(tmp_path / "ckpt.pt", weights_only=True)["model"]
    for name, value in base.items():
        assert torch.equal(saved["0." + name], value.float()), name
    assert not torch.equal(saved["1.weight"], saved["1.weight"].to(dtype).float())  # the adapter's low bits


def test_several_optimizers_each_get_their_storage():
    torch.manual_seed(0)
    fabric = lightning_mp.Fabric(accelerator="cpu", devices=1, precision="bf16-master")
    model = fabric.setup_module(Net())
    adamw = torch.optim.AdamW(model.inp.parameters(), lr=1e-2)
    adagrad = torch.optim.Adagrad(model.out.parameters(), lr=1e-2)
    opt1, opt2 = fabric.setup_optimizers(adamw, adagrad)
    r = coefficients(model.module)
    before = values(fabric, model)
    for _ in range(2):
        fabric.backward(linear_loss(model, r))
        opt1.step()
        opt2.step()
        opt1.zero_grad()
        opt2.zero_grad()
    after = values(fabric, model)
    assert "remainder" in adamw.state[model.inp.weight]  # adopted
    assert adagrad.state[model.out.weight]["sum"].dtype == torch.float32  # on FP32 masters
    assert all(not torch.equal(before[k], after[k]) for k in after if not k.startswith("norm"))


@pytest.mark.parametrize("precision", ["bf16-master", "16-master"])
def test_an_unmarked_method_runs_outside_autocast_as_under_bf16_true(precision):
    """`fabric_model.generate(...)` (not marked with `mark_forward_method`) bypasses Fabric's
    autocast: Llama's FP32 RMSNorm output then reached the 16-bit q_proj and failed. Now it runs
    in 16 bits, as under bf16-true, the kept norms in FP32 inside."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
        num_key_value_heads=2, pad_token_id=1))
    fabric = lightning_mp.Fabric(accelerator="cpu", devices=1, precision=precision)
    model = fabric.setup(model)
    prompt = torch.tensor([[0, 5, 9]])
    out = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=3, do_sample=False)
    assert out.shape == (1, 6) and out[0, :3].tolist() == [0, 5, 9]
    assert model.model.norm.weight.dtype == torch.float32  # the norm kept FP32 all along


def test_precision_name_and_plugin_together_is_an_error():
    with pytest.raises(ValueError, match="give one of them"):
        lightning_mp.Fabric(accelerator="cpu", precision="bf16-master", plugins=[MasterWeightPrecision()])


DDP_SCRIPT = textwrap.dedent('''
    import sys, torch
    sys.path.insert(0, {tests!r})
    import lightning_mp
    from lightning_mp.fabric import MasterWeightPrecision
    from lightning_mp.parallel import exit_after_leaving, leave_process_group
    from test_fabric import Net, coefficients

    fabric = lightning_mp.Fabric(accelerator="cpu", devices=2, strategy="ddp",
                                 plugins=[MasterWeightPrecision("bf16-master", grad_reduce_dtype="fp32")])
    fabric.launch()
    torch.manual_seed(fabric.global_rank)  # different initial values: rank 0's must win
    model = Net()
    r = coefficients(model)
    # frozen and unused, bf16 numbers on rank 0 only: the ranks disagree on keeping storage beside it
    model.frozen = torch.nn.Linear(4, 4, bias=False).requires_grad_(False)
    if fabric.global_rank == 0:
        model.frozen.weight.data = model.frozen.weight.data.bfloat16().float()
    model, opt = fabric.setup(model, torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1e-2,
                                                     momentum=0.9))
    for step in range(3):
        for micro in range(2):
            with fabric.no_backward_sync(model, enabled=micro == 0):
                scale = 1.0 + micro + 2 * fabric.global_rank  # each rank its own batches
                zero = 0 * model(torch.ones(2, 8)).sum()  # through DDP's forward; adds exact zeros
                fabric.backward(sum((p.float() * r[n]).sum() for n, p in model.module.named_parameters()
                                    if n in r) * scale + zero)
        opt.step()
        opt.zero_grad()
    state = {{k: v.float() for k, v in model.state_dict().items()}}
    total = fabric.all_reduce(torch.ones(()), reduce_op="sum")
    if fabric.global_rank == 0:
        torch.save({{"state": state, "total": total}}, {out!r})
    leave_process_group()
    exit_after_leaving()  # (without the interpreter's teardown, where torch may abort)
''')


@pytest.mark.slow
def test_ddp_on_two_processes_steps_the_average_of_every_micro_batch(tmp_path):
    """Rank r's two micro-batches have gradient scales 1 + 2r and 2 + 2r: the averaged step is a
    one-process run whose micro-batch scales sum to (1 + 2 + 3 + 4) / 2 = 5 per step. A frozen
    layer that only rank 0 holds as bf16 numbers ends as rank 0's on both (the setup broadcast)."""
    script = tmp_path / "ddp_fabric.py"
    out = tmp_path / "ddp.pt"
    script.write_text(DDP_SCRIPT.format(tests=str(Path(__file__).parent), out=str(out)))
    result = subprocess.run([sys.executable, str(script)], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    saved = torch.load(out, weights_only=True)
    assert saved["total"] == 2  # fabric.all_reduce is untouched
    torch.manual_seed(0)
    fabric = L.Fabric(accelerator="cpu", devices=1, precision="32-true")
    model = Net()
    r = coefficients(model)
    frozen = torch.nn.Linear(4, 4, bias=False).weight.detach().bfloat16().float()  # rank 0's
    assert torch.equal(saved["state"].pop("frozen.weight"), frozen)
    model, opt = fabric.setup(model, torch.optim.SGD(model.parameters(), lr=1e-2, momentum=0.9))
    for _ in range(3):
        fabric.backward(linear_loss(model, r, 5.0))
        opt.step()
        opt.zero_grad()
    assert_equal(saved["state"], values(fabric, model))


def test_a_plain_fabric_warns_when_optimizer_state_was_loaded_before_the_plugin_saw_it(tmp_path):
    fabric, model, opt, _ = train("bf16-master", "adamw", master="fp32")
    fabric.save(tmp_path / "c.pt", {"optimizer": opt})
    other = fabric_for("bf16-master", master="fp32")
    m2 = other.setup_module(Net())
    o2 = other.setup_optimizers(torch.optim.AdamW(m2.parameters(), lr=1e-2))  # on its own: not seen yet
    other.load(tmp_path / "c.pt", {"optimizer": o2})
    with pytest.warns(UserWarning, match="attach"):
        other.backward(linear_loss(m2, coefficients(Net())))
        o2.step()


class Probe(nn.Module):
    """Two linear layers and a LayerNorm applied to the same input, loss = sum of their outputs
    times fixed coefficients: the gradients do not depend on the weights and, for these inputs
    (multiples of 1/2) and coefficients (multiples of 1/4), are exact in bf16, while every weight
    is used inside its module's forward (FSDP2 all-gathers it there)."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(8, 16)
        self.b = nn.Linear(8, 4)
        self.norm = nn.LayerNorm(8)
        g = torch.Generator().manual_seed(3)
        self.x = torch.randint(-3, 4, (4, 8), generator=g).float() / 2
        self.c = [torch.randint(-4, 5, shape, generator=g).float() / 4 for shape in ((4, 16), (4, 4), (4, 8))]

    def forward(self, scale):
        outs = (self.a(self.x), self.b(self.x), self.norm(self.x))
        return sum((out.float() * c).sum() for out, c in zip(outs, self.c)) * scale


FSDP2_SCRIPT = textwrap.dedent('''
    import json, sys, torch
    sys.path.insert(0, {tests!r})
    from lightning.fabric.strategies import ModelParallelStrategy
    import lightning_mp
    from lightning_mp.fabric import FSDP2MasterWeightPrecision
    from lightning_mp.parallel import exit_after_leaving, leave_process_group
    from test_fabric import Probe

    args = json.loads(sys.argv[1])
    plugin = FSDP2MasterWeightPrecision(args["precision"], **args["options"])

    def parallelize(model, mesh):
        return plugin.shard(model, mesh["data_parallel"], blocks=[torch.nn.Linear])

    strategy = ModelParallelStrategy(parallelize, data_parallel_size=2, tensor_parallel_size=1)
    fabric = lightning_mp.Fabric(accelerator="cpu", devices=2, strategy=strategy, plugins=[plugin])
    fabric.launch()
    torch.manual_seed(0)
    model = fabric.setup_module(Probe())
    opt = fabric.setup_optimizers(torch.optim.SGD(model.parameters(), lr=1e-2, momentum=0.9))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda t: 1 / (1 + t))
    start = 0
    if args.get("load"):
        rest = fabric.load(args["load"], {{"model": model, "optimizer": opt}})
        start = rest["step"]
        sched.load_state_dict(rest["scheduler"])  # (ModelParallelStrategy returns other objects' state)
    for step in range(start, args["steps"]):
        scale = float("inf") if step == args.get("nan_at") else 1.0 + 2 * fabric.global_rank
        fabric.backward(model(scale))
        fabric.clip_gradients(model, opt, max_norm=args["clip"])
        opt.step()
        opt.zero_grad()
        sched.step()
        if step + 1 == args.get("save_at"):
            fabric.save(args["out"] + "/ckpt", {{"model": model, "optimizer": opt, "scheduler": sched.state_dict(),
                                                "step": step + 1}})
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    state = get_model_state_dict(model.module, options=StateDictOptions(full_state_dict=True))
    dtypes = sorted({{str(p.dtype) for p in model.module.parameters()}})
    if fabric.global_rank == 0:
        torch.save({{"state": state, "skipped": plugin.skipped_steps, "dtypes": dtypes,
                    "lr": opt.param_groups[0]["lr"]}}, args["out"] + "/result.pt")
    leave_process_group()
    exit_after_leaving()  # (without the interpreter's teardown, where torch may abort)
''')


def run_fsdp2(tmp_path, name, **args):
    out = tmp_path / name
    out.mkdir()
    script = tmp_path / "fsdp2_fabric.py"
    script.write_text(FSDP2_SCRIPT.format(tests=str(Path(__file__).parent)))
    args = {"precision": "bf16-master", "options": {}, "steps": 4, "clip": 100.0, "out": str(out), **args}
    result = subprocess.run([sys.executable, str(script), json.dumps(args)], cwd=tmp_path, capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return torch.load(out / "result.pt", weights_only=True)


def reference_run(steps, clip, nan_at=None):
    """One process, 32-true, the ranks' average gradient scale (1 + 3) / 2 = 2 per step, the same schedule."""
    torch.manual_seed(0)
    fabric = L.Fabric(accelerator="cpu", devices=1, precision="32-true")
    model = Probe()
    model, opt = fabric.setup(model, torch.optim.SGD(model.parameters(), lr=1e-2, momentum=0.9))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda t: 1 / (1 + t))
    for step in range(steps):
        if step == nan_at:
            continue  # skipped, the schedule held
        fabric.backward(model(2.0))
        fabric.clip_gradients(model, opt, max_norm=clip)
        opt.step()
        opt.zero_grad()
        sched.step()
    return values(fabric, model)


@pytest.mark.slow
@pytest.mark.parametrize("master", ["auto", "fp32"])
def test_fsdp2_on_two_processes_trains_as_one_32_true_process_and_skips_on_both(tmp_path, master):
    """ModelParallelStrategy with the plugin's shard(): bf16 shards with int16 remainders (the
    default) or FP32 shards, clipped by the global norm of the FP32 gradient shards, a NaN on
    the second step skipped on both ranks, its scheduler held."""
    result = run_fsdp2(tmp_path, master, options={"master": master}, nan_at=1, clip=3.0)
    assert result["skipped"] == 1 and result["lr"] == 1e-2 / (1 + 3)  # 3 steps taken, the schedule held once
    assert result["dtypes"] == (["torch.bfloat16", "torch.float32"] if master == "auto" else ["torch.float32"])
    assert_equal({k: v.float() for k, v in result["state"].items()}, reference_run(4, 3.0, nan_at=1))


@pytest.mark.slow
@pytest.mark.parametrize("precision, options", [("bf16-master", {}), ("16-master", {"init_scale": 2.0**8})])
def test_fsdp2_distributed_checkpoint_resumes_bit_exactly(tmp_path, precision, options):
    """A distributed checkpoint (a directory of shards) at step 2 of 4, a NaN at step 1 before it:
    the resumed run ends bit for bit as the straight one, its skip count and loss scale restored."""
    common = dict(precision=precision, options=options, nan_at=1, clip=3.0)
    straight = run_fsdp2(tmp_path, "straight", save_at=2, **common)
    assert (tmp_path / "straight" / "ckpt").is_dir()
    resumed = run_fsdp2(tmp_path, "resumed", load=str(tmp_path / "straight" / "ckpt"), **common)
    assert resumed["skipped"] == straight["skipped"] == 1 and resumed["lr"] == straight["lr"]
    assert_equal(resumed["state"], straight["state"])


def test_the_strategy_picks_the_plugin():
    from lightning.fabric.strategies import ModelParallelStrategy

    from lightning_mp.fabric import FSDP2MasterWeightPrecision

    fabric = lightning_mp.Fabric(accelerator="cpu", devices=1, precision="16-master",
                                 strategy=ModelParallelStrategy(lambda model, mesh: model))
    assert isinstance(fabric.strategy.precision, FSDP2MasterWeightPrecision) and fabric.strategy.precision.scaler
    assert isinstance(lightning_mp.Fabric(accelerator="cpu", devices=1, precision="32-true").strategy.precision,
                      L.fabric.plugins.precision.Precision)  # Lightning's own names pass through
    with pytest.raises(ValueError, match="FSDP1"):
        lightning_mp.Fabric(accelerator="cpu", devices=1, strategy="fsdp", precision="bf16-master")


@pytest.mark.parametrize("master", ["fp32", "remainder", "kahan", "stochastic"])
def test_every_storage_policy_under_fabric(master):
    """SGD on gradients exact in bf16: fp32 and remainder are 32-true bit for bit. A Kahan pair
    keeps about 16 significant bits, stochastic rounding the bf16 weight alone (its initial value
    rounded, then each of 4 steps within one bf16 step, 2**-7 of the weight): each rounding is
    relative to the weight's magnitude along the way, within 0.3 of its end (4 SGD steps at lr
    1e-2 with momentum 0.9 on gradients of at most 2 move it by less)."""
    fabric, model, opt, _ = train("bf16-master", "sgd", master=master)
    state = opt.optimizer.state_dict()["state"][0]
    assert {"remainder": "remainder" in state, "kahan": "compensation" in state}.get(master, True)
    ours, ref = values(fabric, model), values(*train("32-true", "sgd")[:2])
    slack = {"fp32": 0.0, "remainder": 0.0, "kahan": 5 * 2**-16, "stochastic": 5 * 2**-7}[master]
    for key in ours:
        assert ((ours[key] - ref[key]).abs() <= slack * (ref[key].abs() + 0.3)).all(), key
