"""``MoEModule``: the MoE language model as a LightningModule that users train, configure or subclass."""

from __future__ import annotations

import math
import time
from dataclasses import fields
from typing import Any, Literal, Optional

import lightning.pytorch as L
import torch
import torch.nn.functional as F
from lightning.pytorch.plugins.precision import HalfPrecision, Precision
from lightning.pytorch.strategies import ModelParallelStrategy
from torch import Tensor, nn
from torchmetrics import MeanMetric

from lightning_mp import loading
from lightning_mp.convert import is_norm_layer
from lightning_mp.model import Block, MoETransformer, TransformerConfig
from lightning_mp.moe import MoEConfig, MoELayer, SwiGLU
from lightning_mp.optim import AdamW, peers
from lightning_mp.optim.adamw import CANNOT_STEP
from lightning_mp.parallel import clip_by_global_norm
from lightning_mp.precision.fsdp2 import FSDP2MasterWeightPrecision
from lightning_mp.precision.master import MasterWeightPrecision


class MoEModule(L.LightningModule):
    """A decoder-only Mixture-of-Experts language model.

    Batches are ``(inputs, targets)`` pairs of LongTensors ``(batch, time)``, as
    :class:`lightning_mp.data.ByteTextDataModule` yields them. The loss is next-token cross
    entropy plus ``aux_loss_coef`` times the load-balancing loss and ``z_loss_coef`` times the
    router z-loss, each summed over the MoE layers.

    Extension points for subclasses:

    - ``make_expert(layer) -> nn.Module``: one expert of MoE layer ``layer`` (called once per
      expert), mapping ``(tokens, d_model)`` to ``(tokens, d_model)``. Not overriding it keeps
      the stacked SwiGLU experts that run as grouped matmuls.
    - ``make_router(layer) -> nn.Module``: maps ``(tokens, d_model)`` to logits
      ``(tokens, n_experts)``; whatever it returns runs in FP32, weights and math.
    - ``configure_model``: replace the whole model (set ``self.model``).
    """

    def __init__(
        self,
        vocab_size: int = 256,
        d_model: int = 128,
        n_layers: int = 4,
        n_heads: int = 4,
        n_experts: int = 8,
        top_k: int = 2,
        d_ff: int = 256,
        moe_every: int = 1,
        capacity_factor: Optional[float] = None,
        score_func: Literal["softmax", "sigmoid"] = "softmax",
        n_shared_experts: int = 0,
        aux_loss_coef: float = 1e-2,
        aux_loss_scope: Literal["micro_batch", "global"] = "micro_batch",
        z_loss_coef: float = 1e-3,
        bias_update_rate: float = 0.0,
        norm_topk_prob: Optional[bool] = None,
        routed_scaling_factor: float = 1.0,
        n_groups: int = 1,
        topk_groups: int = 1,
        router_jitter: float = 0.0,
        init_std: Optional[float] = None,
        init_depth_scaled: bool = False,
        token_buckets: Optional[int] = None,
        max_seq_len: int = 256,
        positions: Literal["rope", "learned"] = "rope",
        lr: float = 3e-3,
        weight_decay: float = 0.1,
        betas: tuple[float, float] = (0.9, 0.95),
        warmup_steps: int = 50,
        min_lr_ratio: float = 0.1,
        decay_steps: Optional[int] = None,
        moment_dtype: Literal["float32", "bfloat16", "8bit"] = "float32",
        optimizer_impl: Literal["auto", "torchao-adamw", "torchao-adamw8bit", "optimi-adamw"] = "auto",
        expert_parallel: int = 1,
    ) -> None:
        super().__init__()
        if expert_parallel < 1 or n_experts % expert_parallel:
            raise ValueError(f"expert_parallel={expert_parallel} must be >= 1 and divide n_experts={n_experts}")
        self.save_hyperparameters()
        # The model's configs take the matching constructor arguments, by field name.
        hp = self.hparams
        self.config = TransformerConfig(
            **{f.name: hp[f.name] for f in fields(TransformerConfig) if f.name in hp},
            moe=MoEConfig(**{f.name: hp[f.name] for f in fields(MoEConfig) if f.name in hp}),
        )
        self.model: Optional[nn.Module] = None
        self._batch_start: Optional[float] = None
        # Validation and test losses per token: each batch's mean weighted by its tokens, summed in
        # float64 and over the ranks (torchmetrics' all-reduce at the epoch's end), so uneven last
        # batches and uneven ranks count each token once.
        self.val_token_loss = MeanMetric().set_dtype(torch.float64)
        self.test_token_loss = MeanMetric().set_dtype(torch.float64)

    @classmethod
    def load_from_checkpoint(cls, checkpoint_path: Any, *args: Any, weights_only: Optional[bool] = None,
                             **kwargs: Any) -> "MoEModule":  # type: ignore[override]
        """Lightning's, after checking the file holds plain data only (one line naming what it holds
        otherwise; ``weights_only=False`` loads a file you trust)."""
        loading.check(checkpoint_path, trust=weights_only is False)
        return super().load_from_checkpoint(checkpoint_path, *args, weights_only=weights_only, **kwargs)

    @classmethod
    def from_hf(cls, hf_model: nn.Module, **kwargs: Any) -> "MoEModule":
        """Train a Hugging Face Mixtral or Qwen3-MoE causal LM as this module: its sparse MoE blocks
        become :class:`~lightning_mp.moe.MoELayer` (FP32 routing, this module's losses and metrics),
        in place; the rest stays Hugging Face's. ``kwargs`` set the training options (``lr``...).
        :func:`lightning_mp.hf.to_hf` turns the result back into a ``transformers`` model."""
        from lightning_mp.hf import HFCausalLM, moe_config

        config, moe = hf_model.config, moe_config(hf_model.config)
        module = cls(vocab_size=config.vocab_size, d_model=config.hidden_size, n_layers=config.num_hidden_layers,
                     n_heads=config.num_attention_heads, n_experts=moe.n_experts, top_k=moe.top_k, d_ff=moe.d_ff,
                     norm_topk_prob=moe.norm_topk_prob, router_jitter=moe.router_jitter,
                     max_seq_len=config.max_position_embeddings, **{"aux_loss_coef": moe.aux_loss_coef, **kwargs})
        module.model = HFCausalLM(hf_model)
        return module

    # -- extension points ---------------------------------------------------------------------

    def make_expert(self, layer: int) -> nn.Module:
        """One expert of MoE layer ``layer``. The default, a SwiGLU FFN, is run stacked instead."""
        return SwiGLU(self.config.d_model, self.config.moe.d_ff)

    def make_router(self, layer: int) -> nn.Module:
        """The router of MoE layer ``layer``: ``(tokens, d_model) -> (tokens, n_experts)`` logits."""
        return nn.Linear(self.config.d_model, self.config.moe.n_experts, bias=False)

    def configure_model(self) -> None:
        """Build the model once (Lightning calls this before the precision plugin converts it);
        under ``ModelParallelStrategy`` with our FSDP2 plugin, shard it."""
        if self.model is None:
            custom_expert = type(self).make_expert is not MoEModule.make_expert
            custom_router = type(self).make_router is not MoEModule.make_router
            self.model = MoETransformer(
                self.config,
                make_router=self.make_router if custom_router else None,
                make_expert=self.make_expert if custom_expert else None,
            )
        self._shard_if_model_parallel()

    def _shard_if_model_parallel(self) -> None:
        """Under ``ModelParallelStrategy``: one FSDP2 unit per transformer block, the whole model
        last, by ``FSDP2MasterWeightPrecision`` (norms and routers FP32 units of their own) or
        with FSDP2's default policy under Lightning's precisions; with ``expert_parallel > 1``
        each rank keeps its share of the experts (:mod:`lightning_mp.parallel`). Outside a
        Trainer the model holds every expert, whatever ``expert_parallel`` says."""
        from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy

        from lightning_mp.parallel import expert_meshes, outermost, shard_units

        trainer = self._trainer
        ep = self.hparams.get("expert_parallel", 1)
        if trainer is None:
            return
        if not isinstance(trainer.strategy, ModelParallelStrategy):
            if ep > 1:
                raise ValueError(f"expert_parallel={ep} needs ModelParallelStrategy over a multiple of {ep} processes "
                                 "(trainer=fsdp2), not " + type(trainer.strategy).__name__)
            return
        if isinstance(self, FSDPModule):  # sharded already (configure_model runs more than once)
            return
        mesh = self.device_mesh["data_parallel"]
        layers, expert_mesh = self.moe_layers if ep > 1 else [], None
        if layers:
            expert_mesh, ep_mesh = expert_meshes(mesh, ep)
            for layer in layers:
                layer.parallelize_experts(ep_mesh)
        experts = [layer.experts for layer in layers]
        plugin = trainer.precision_plugin
        if hasattr(plugin, "shard"):
            plugin.shard(self, mesh, blocks=[Block], experts=experts, expert_mesh=expert_mesh)
        else:  # Lightning's precisions: FP32 units (autocast casts for *-mixed), routers apart
            kept = outermost([m for m in self.modules() if getattr(m, "keep_fp32", False) is True])
            shard_units(self, mesh, lambda kind: MixedPrecisionPolicy(), kept=kept, blocks=[Block], experts=experts,
                        expert_mesh=expert_mesh)

    def extra_repr(self) -> str:
        """``print(module)`` before ``fit``: the layers do not exist yet, so say where they come from."""
        if self.model is not None:
            return ""
        c = self.config
        return (f"d_model={c.d_model}, n_layers={c.n_layers}, n_experts={c.moe.n_experts}, top_k={c.moe.top_k}; "
                "layers not built yet: fit builds them in configure_model(); call it to see them")

    # -- forward and losses -------------------------------------------------------------------

    def forward(self, tokens: Tensor) -> Tensor:
        """``tokens (batch, time)`` LongTensor to logits ``(batch, time, vocab)``."""
        self.configure_model()
        return self.model(tokens)

    @property
    def moe_layers(self) -> list[MoELayer]:
        return [m for m in self.model.modules() if isinstance(m, MoELayer)] if self.model is not None else []

    def _lm_loss(self, batch: tuple[Tensor, Tensor]) -> Tensor:
        tokens, targets = batch
        logits = self(tokens)
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        lm_loss = self._lm_loss(batch)
        layers = self.moe_layers
        moe = self.config.moe
        aux = torch.stack([m.aux_loss for m in layers]).sum() if layers else lm_loss.new_zeros(())
        z = torch.stack([m.z_loss for m in layers]).sum() if layers else lm_loss.new_zeros(())
        loss = lm_loss + moe.aux_loss_coef * aux + moe.z_loss_coef * z
        self.log("train/loss", lm_loss, prog_bar=True)
        self.log("train/aux_loss", aux)
        self.log("train/z_loss", z)
        self._log_routing(layers)
        return loss

    def _log_routing(self, layers: list[MoELayer]) -> None:
        if not layers:
            return
        for i, layer in enumerate(layers):  # load and imbalance: per optimizer step (optimizer_step)
            self.log(f"moe/layer{i}/router_entropy", layer.stats["entropy"])
        self.log("moe/drop_frac", torch.stack([m.stats["drop_frac"] for m in layers]).mean())

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        self.val_token_loss.update(self._lm_loss(batch), weight=batch[1].numel())

    def on_validation_epoch_end(self) -> None:
        loss = self.val_token_loss.compute()  # one all-reduce under DDP: the same value on every rank
        self.val_token_loss.reset()
        self.log("val/loss", loss, prog_bar=True)
        self.log_dict({"val/ppl": loss.exp(), "val/bits_per_byte": loss / math.log(2)})

    def test_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        self.test_token_loss.update(self._lm_loss(batch), weight=batch[1].numel())

    def on_test_epoch_end(self) -> None:
        loss = self.test_token_loss.compute()
        self.test_token_loss.reset()
        self.log_dict({"test/loss": loss, "test/bits_per_byte": loss / math.log(2)})

    # -- throughput and balancing -------------------------------------------------------------

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        self._batch_start = time.perf_counter()

    def optimizer_step(self, *args: Any, **kwargs: Any) -> None:
        """Lightning's step, then the step's routing (:meth:`_route_step`): the counts of every
        micro-batch of the step, the last one run inside the step's closure."""
        super().optimizer_step(*args, **kwargs)
        self._route_step()

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        """Under manual optimization Lightning calls no ``optimizer_step`` of ours: the step's
        routing runs here, before each ``opt.step()`` that is not skipped (a skipped step's counts
        go to the next step; a second optimizer's step in the same batch finds none)."""
        if not self.automatic_optimization:
            self._route_step()

    def _route_step(self) -> None:
        """Load and imbalance logged and the expert biases moved, from every rank's token counts
        since the last optimizer step."""
        load = self.balance_experts()
        if not load.any():  # host sync, once per step: no training forward since the last step
            return
        for i, (layer, counts) in enumerate(zip(self.moe_layers, load)):
            share = counts / counts.sum()
            for e, value in enumerate(share):
                self.log(f"moe/layer{i}/load_expert{e}", value)
            self.log(f"moe/layer{i}/imbalance", share.max() / share.mean())
            if layer.expert_group is not None:
                # the all-to-all's balance: tokens each EP rank's experts received (over every group), max / mean
                per_rank = counts.reshape(layer.expert_group.size, -1).sum(1)
                self.log(f"moe/layer{i}/ep_imbalance", per_rank.max() / per_rank.mean())

    @torch.no_grad()
    def balance_experts(self) -> Tensor:
        """Each MoE layer's tokens per expert since the last call, summed over the data-parallel
        ranks (one all-reduce for all layers), ``(layers, n_experts)``; the layers with an expert
        bias (``bias_update_rate > 0``) move it by them."""
        layers = self.moe_layers
        if not layers:
            return torch.zeros(0, self.config.moe.n_experts)
        counts = torch.stack([m.take_counts() for m in layers])
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(counts)  # every rank then moves its bias the same way
        for layer, load in zip(layers, counts):
            if layer.balance is not None:
                layer.balance.update(self.config.moe.bias_update_rate, load)
        return counts

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        if self._batch_start is not None:
            elapsed = time.perf_counter() - self._batch_start
            self.log("train/tokens_per_sec", batch[0].numel() / max(elapsed, 1e-9))

    # -- optimization ---------------------------------------------------------------------------

    def configure_gradient_clipping(self, optimizer: torch.optim.Optimizer, gradient_clip_val: Any = None,
                                    gradient_clip_algorithm: Optional[str] = None) -> None:
        """Lightning's clipping; under expert parallelism with Lightning's precisions, clipping by
        norm uses the global norm over the dense and expert meshes (torch's ``clip_grad_norm_``
        cannot mix DTensors of two meshes; our FSDP2 plugin clips that way itself)."""
        expert_parallel = any(layer.expert_group is not None for layer in self.moe_layers)
        plugin = self.trainer.precision_plugin
        if (not expert_parallel or gradient_clip_val is None or gradient_clip_algorithm not in (None, "norm")
                or isinstance(plugin, FSDP2MasterWeightPrecision)):
            return super().configure_gradient_clipping(optimizer, gradient_clip_val, gradient_clip_algorithm)
        grads = [p.grad for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
        clip_by_global_norm(grads, float(gradient_clip_val))

    def configure_optimizers(self) -> dict[str, Any]:
        """AdamW without weight decay on norms, biases and embeddings; linear warm-up, then cosine.

        Under :class:`~lightning_mp.MasterWeightPrecision` and ``FSDP2MasterWeightPrecision`` (or with bf16 or 8-bit
        moments, which ``*-true`` and ``64-true`` weights cannot take: a ``ValueError``) the AdamW is
        :class:`lightning_mp.optim.AdamW`, one fused pass per element over the plugin's FP32 values;
        under ``32-true`` and ``*-true`` torch's ``AdamW(fused=True)`` on CPU and CUDA tensors; else
        torch's default ``AdamW`` (Lightning's AMP and FSDP plugins cannot clip for a fused one).
        ``optimizer_impl`` other than ``"auto"`` picks a peer's AdamW under ``bf16-true``
        (:mod:`lightning_mp.optim.peers`: torchao's, optimi's), to train side by side with ours.

        The cosine reaches ``lr * min_lr_ratio`` at step ``decay_steps`` and stays there, like
        nanoGPT's ``lr_decay_iters``: a fixed schedule, so a run stopped at step N and resumed to 2N
        trains exactly as one run of 2N steps. ``decay_steps=None`` (the default) spans the run
        instead (``trainer.max_steps``; a warm-up longer than the run is shortened to it).
        """
        hp = self.hparams
        decay, no_decay = [], []
        no_decay_ids = {
            id(p)
            for name, m in self.model.named_modules()
            if isinstance(m, nn.Embedding) or is_norm_layer(name, m)  # the norms the plugin keeps FP32
            for p in m.parameters(recurse=False)
        }
        for name, p in self.named_parameters():
            if not p.requires_grad:
                continue
            (no_decay if id(p) in no_decay_ids or name.endswith("bias") else decay).append(p)
        groups = [{"params": decay, "weight_decay": hp.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
        plugin = self.trainer.precision_plugin
        if hp.optimizer_impl != "auto":  # a peer's AdamW (lightning_mp.optim.peers): bf16 weights it steps itself
            if getattr(plugin, "precision", None) != "bf16-true" or hp.moment_dtype != "float32":
                raise ValueError(f"optimizer_impl={hp.optimizer_impl} steps bf16 weights itself: it needs "
                                 "precision='bf16-true' and moment_dtype='float32'")
            optimizer: torch.optim.Optimizer = peers.adamw(hp.optimizer_impl, groups, hp.lr, hp.betas)
        elif isinstance(plugin, (MasterWeightPrecision, FSDP2MasterWeightPrecision)) or hp.moment_dtype != "float32":
            if getattr(plugin, "precision", None) in CANNOT_STEP and hp.moment_dtype != "float32":
                raise ValueError(f"moment_dtype={hp.moment_dtype!r} needs lightning_mp.optim.AdamW, which cannot step "
                                 f"precision={plugin.precision!r} ({CANNOT_STEP[plugin.precision]}): use "
                                 "'bf16-master', '16-master', 'bf16-mixed' or '32-true'")
            # lightning-mp's AdamW: one fused pass per element through the plugin's FP32 values (every
            # master policy; FSDP2's shards too), or bf16 or 8-bit Adam moments
            optimizer = AdamW(
                groups,
                lr=hp.lr,
                betas=tuple(hp.betas),
                moment_dtype=hp.moment_dtype,
                seed=torch.initial_seed() % 2**63,  # follows seed_everything: reproducible rounding
            )
        else:
            # 32-true and *-true: torch's fused AdamW (its fastest). Lightning's AMP plugins (*-mixed)
            # and FSDP's refuse to clip gradients for a fused optimizer: torch's default AdamW there.
            params = [p for g in groups for p in g["params"]]
            fused = type(plugin) in (Precision, HalfPrecision) and all(
                type(p.data) is torch.Tensor and p.device.type in ("cpu", "cuda") for p in params)
            optimizer = torch.optim.AdamW(groups, lr=hp.lr, betas=tuple(hp.betas), fused=fused or None)
        if hp.decay_steps is not None:  # a fixed schedule: a run stopped and resumed trains as one
            warmup, decay_end = hp.warmup_steps, hp.decay_steps
        else:  # the schedule spans the run (trainer.max_steps)
            total = max(int(self.trainer.estimated_stepping_batches), 1)
            warmup, decay_end = min(hp.warmup_steps, total), total

        def schedule(step: int) -> float:
            if step < warmup:
                return (step + 1) / warmup
            progress = min((step - warmup) / max(decay_end - warmup, 1), 1.0)
            return hp.min_lr_ratio + (1 - hp.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
