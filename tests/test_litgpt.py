"""litgpt as the client: its GPT in a loop shaped like litgpt's finetune/full.py, and litgpt's own
``finetune_full`` run through ``lightning-mp-litgpt --precision bf16-master``."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import lightning_mp
from lightning_mp import bytes_per_param, memory_audit

litgpt = pytest.importorskip("litgpt")

CONFIG = dict(block_size=64, vocab_size=256, padded_vocab_size=256, n_layer=2, n_head=4, n_embd=64, bias=False,
              norm_class_name="RMSNorm", mlp_class_name="LLaMAMLP", intermediate_size=128, rotary_percentage=1.0,
              parallel_residual=False)


def finetune(precision, initial, steps=10, lr=1e-5):
    """litgpt's finetune/full.py, cut to its training steps: init_module(empty_init=True), setup,
    the pretrained weights loaded after setup, AdamW set up on its own, chunked cross-entropy."""
    from litgpt import GPT, Config
    from litgpt.utils import chunked_cross_entropy

    fabric = lightning_mp.Fabric(accelerator="cpu", devices=1, precision=precision)
    with fabric.init_module(empty_init=True):
        model = GPT(Config(**CONFIG))
    model = fabric.setup(model)
    model.load_state_dict(initial)
    optimizer = fabric.setup_optimizers(torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0))
    g = torch.Generator().manual_seed(0)
    audit = None
    for _ in range(steps):
        x = torch.randint(0, 256, (4, 64), generator=g)
        logits = model(x)
        fabric.backward(chunked_cross_entropy(logits[..., :-1, :], x[..., 1:]))
        fabric.clip_gradients(model, optimizer, max_norm=1.0)
        optimizer.step()
        optimizer.zero_grad()
        audit = audit or bytes_per_param(memory_audit(model, [optimizer], fabric.strategy.precision))
    return {k: v.float() for k, v in model.state_dict().items()}, audit["total"]


def test_litgpt_gpt_fine_tuned_at_a_small_learning_rate_tracks_32_true_where_bf16_true_freezes():
    """At lr 1e-5 an Adam update (about lr) is below half a bf16 step of any weight above
    1e-5 / 2**-9 = 0.005 in magnitude, most of this model's: bf16-true leaves them where they
    were, bf16-master moves every weight as 32-true does (up to bf16 compute's rounding)."""
    from litgpt import GPT, Config

    torch.manual_seed(0)
    initial = GPT(Config(**CONFIG)).state_dict()
    runs = {p: finetune(p, initial) for p in ("32-true", "bf16-true", "bf16-master")}
    start = {p: {k: v.to(torch.bfloat16).float() if p == "bf16-true" else v for k, v in initial.items()} for p in runs}
    moved = {p: torch.cat([(runs[p][0][k] - start[p][k]).flatten() for k in initial]) for p in runs}
    big = torch.cat([(initial[k].abs() > 0.01).flatten() for k in initial])  # where bf16 cannot take 1e-5
    assert (moved["bf16-true"][big] != 0).float().mean() < 0.05
    assert (moved["bf16-master"] != 0).float().mean() > 0.99
    # The direction: Adam moves each weight by about lr whatever its gradient's size, so the cosine
    # is about 1 - 2f, f the fraction of moves whose sign bf16 compute flips (gradients within its
    # error of zero). 0.95 allows f = 2.5 %: for gradients spread like a Gaussian's (a density
    # of 0.8 / sigma at 0), an error of 3 % of sigma, some 8 of bf16's unit roundoffs (2**-8)
    # through the two layers' roundings. (1 - cosine is 3e-4 on an AMD EPYC with avx512_bf16.)
    cosine = torch.nn.functional.cosine_similarity(moved["bf16-master"], moved["32-true"], dim=0)
    assert cosine > 0.95, cosine
    # 2 + 4 and 2 + 2 + 8 bytes per parameter, plus Adam's step counters (and FP32 RMSNorms under bf16-master)
    assert 6.0 < runs["bf16-true"][1] < 6.01 and 12.0 < runs["bf16-master"][1] < 12.05


def _litgpt_checkpoint(directory: Path, dtype: torch.dtype = torch.float32) -> None:
    """A tiny litgpt checkpoint directory: model config, weights (FP32 ones that bf16 cannot hold,
    or those rounded to ``dtype``), a byte-level tokenizer."""
    import yaml
    from litgpt import GPT, Config
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    directory.mkdir()
    vocab = {c: i for i, c in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    vocab.update({"<s>": 256, "</s>": 257})
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.save(str(directory / "tokenizer.json"))
    (directory / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": "<s>", "eos_token": "</s>", "add_bos_token": False, "tokenizer_class": "PreTrainedTokenizerFast"}))
    config = Config(**{**CONFIG, "name": "tiny", "block_size": 256, "vocab_size": 258, "padded_vocab_size": 264})
    (directory / "model_config.yaml").write_text(yaml.safe_dump(dataclasses.asdict(config)))
    torch.manual_seed(0)
    state = {k: v + 1e-4 * torch.randn_like(v) for k, v in GPT(config).state_dict().items()}  # values bf16 cannot hold
    torch.save({k: v.to(dtype) for k, v in state.items()}, directory / "lit_model.pth")


def _litgpt(tmp_path: Path, script: str, *options: str) -> subprocess.CompletedProcess:
    """``lightning-mp-litgpt <script> ckpt --precision bf16-master``: 2 steps on a tiny JSON dataset."""
    rows = [{"instruction": f"Add {i} and {i + 1}.", "input": "", "output": f"{2 * i + 1}"} for i in range(16)]
    (tmp_path / "data.json").write_text(json.dumps(rows))
    command = [sys.executable, "-c", "from lightning_mp.fabric.litgpt import main; main()", script,
               str(tmp_path / "ckpt"), "--precision", "bf16-master", "--out_dir", str(tmp_path / "out"),
               "--data", "JSON", "--data.json_path", str(tmp_path / "data.json"), "--data.val_split_fraction", "0.25",
               "--data.num_workers", "0", "--train.max_steps", "2", "--train.global_batch_size", "2",
               "--train.micro_batch_size", "1", "--train.lr_warmup_steps", "1", "--eval.interval", "100",
               "--eval.max_iters", "1", "--eval.final_validation", "false", *options]
    result = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


@pytest.mark.slow
def test_litgpt_finetune_full_runs_with_bf16_master_through_lightning_mp_litgpt(tmp_path):
    """litgpt's own script, from its command line: at lr 0 the final checkpoint holds the
    pretrained FP32 values bit for bit (nothing rounded them at load or at the steps)."""
    _litgpt_checkpoint(tmp_path / "ckpt")
    result = _litgpt(tmp_path, "finetune_full",
                     "--optimizer", json.dumps({"class_path": "torch.optim.AdamW", "init_args": {"lr": 0.0}}))
    assert "bf16-master keeps each weight's FP32 value for AdamW" in result.stdout + result.stderr
    final = torch.load(tmp_path / "out" / "final" / "lit_model.pth", weights_only=True)
    pretrained = torch.load(tmp_path / "ckpt" / "lit_model.pth", weights_only=True)
    assert final["model"].keys() == pretrained.keys()
    for key, value in pretrained.items():
        assert final["model"][key].dtype == torch.float32 and torch.equal(final["model"][key], value), key


@pytest.mark.slow
def test_litgpt_finetune_lora_runs_with_bf16_master_and_merges_the_bf16_base_exactly(tmp_path):
    """litgpt's ``finetune_lora`` from its command line on a bf16 base checkpoint: the frozen base
    is loaded after setup (its values bf16 numbers, kept in the weights alone, without a warning
    that they were written outside the optimizer), and at lr 0 (LoRA's B starts at zero) the
    merged checkpoint holds the base's values exactly."""
    _litgpt_checkpoint(tmp_path / "ckpt", torch.bfloat16)
    result = _litgpt(tmp_path, "finetune_lora",
                     "--optimizer", json.dumps({"class_path": "torch.optim.AdamW", "init_args": {"lr": 0.0}}))
    assert "written outside the optimizer" not in result.stderr
    final = torch.load(tmp_path / "out" / "final" / "lit_model.pth", weights_only=True)
    pretrained = torch.load(tmp_path / "ckpt" / "lit_model.pth", weights_only=True)
    assert final.keys() == pretrained.keys()
    for key, value in pretrained.items():
        assert torch.equal(final[key].float(), value.float()), key


@pytest.mark.parametrize("precision", ["bf16-master", "16-master"])
def test_lightning_mp_litgpt_pretrain_takes_the_master_precisions(precision, tmp_path):
    """litgpt's ``pretrain`` annotates ``precision`` with a closed list of Lightning's names, so its
    command-line parser refused ``bf16-master``; litgpt itself still refuses it (the list unchanged
    outside ``lightning-mp-litgpt``). ``--print_config`` parses and validates without training
    (``pretrain``'s data modules need litdata, not a test dependency)."""
    args = ["pretrain", "tiny", "--precision", precision, "--print_config"]
    ours = subprocess.run([sys.executable, "-c", "from lightning_mp.fabric.litgpt import main; main()", *args],
                          cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert ours.returncode == 0, ours.stderr[-2000:]
    assert f"precision: {precision}" in ours.stdout
    theirs = subprocess.run([sys.executable, "-c", "from litgpt.__main__ import main; main()", *args],
                            cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert theirs.returncode != 0 and 'Parser key "precision"' in theirs.stderr


def test_accept_master_precisions_widens_closed_lists_only():
    from typing import Literal, Optional

    from lightning_mp.fabric.litgpt import accept_master_precisions

    def closed(precision=None): ...
    def open_(precision=None): ...

    closed.__annotations__["precision"] = Optional[Literal["bf16-true", "32-true"]]  # (this file's annotations are strings)
    open_.__annotations__["precision"] = Optional[str]
    accept_master_precisions(closed)
    accept_master_precisions(open_)
    assert closed.__annotations__["precision"] == Optional[Literal["bf16-true", "32-true", "bf16-master", "16-master"]]
    assert open_.__annotations__["precision"] == Optional[str]
