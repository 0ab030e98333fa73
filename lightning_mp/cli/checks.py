"""What ``lightning-mp-train`` checks before it trains: each mistake becomes one line naming the key or file.

The checks run on the composed config (types and ranges of every documented key, the corpus;
the checkpoints it names: :mod:`lightning_mp.cli.checkpoints`) so that nothing fails after
minutes of training, or as a traceback from deep inside Lightning.
"""

from __future__ import annotations

import importlib.util
import inspect
import math
from typing import Any, Callable, Optional

from hydra.utils import get_object
from omegaconf import DictConfig, ListConfig, OmegaConf

from lightning_mp.optim.adamw import CANNOT_STEP
from lightning_mp.optim.peers import PEERS, REQUIRES


class UsageError(Exception):
    """A mistake in the run's configuration: reported in one line, exit status 2."""


# -- kinds of value ------------------------------------------------------------------------------


def _int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def integer(low: Optional[int] = None, *, also: tuple = ()) -> Callable[[Any], Optional[str]]:
    """An integer >= ``low`` (or one of ``also``)."""

    def check(x: Any) -> Optional[str]:
        if x in also and not isinstance(x, bool):
            return None
        if not _int(x):
            hint = f" (write {int(x)})" if isinstance(x, float) and x.is_integer() else ""
            return f"must be an integer{hint}"
        if low is not None and x < low:
            alternatives = "".join(f" or {a}" for a in also)
            return f"must be an integer >= {low}{alternatives}"
        return None

    return check


def number(low: Optional[float] = None, high: Optional[float] = None, *, open_low: bool = False,
           open_high: bool = False) -> Callable[[Any], Optional[str]]:
    """A finite number in the interval [``low``, ``high``] (bounds open where asked)."""

    def check(x: Any) -> Optional[str]:
        if not _number(x):
            return "must be a number"
        too_low = low is not None and (x <= low if open_low else x < low)
        too_high = high is not None and (x >= high if open_high else x > high)
        if too_low or too_high:
            left = "" if low is None else f"{'>' if open_low else '>='} {low}"
            right = "" if high is None else f"{'<' if open_high else '<='} {high}"
            return f"must be {' and '.join(p for p in (left, right) if p)}"
        return None

    return check


def choice(*options: Any) -> Callable[[Any], Optional[str]]:
    def check(x: Any) -> Optional[str]:
        return None if x in options else f"must be one of {', '.join(str(o) for o in options)}"

    return check


def optional(rule: Callable[[Any], Optional[str]]) -> Callable[[Any], Optional[str]]:
    def check(x: Any) -> Optional[str]:
        if x is None:
            return None
        problem = rule(x)
        return None if problem is None else f"{problem}, or null"

    return check


def either(*rules: Callable[[Any], Optional[str]], says: str) -> Callable[[Any], Optional[str]]:
    def check(x: Any) -> Optional[str]:
        return None if any(rule(x) is None for rule in rules) else says

    return check


def betas(x: Any) -> Optional[str]:
    ok = isinstance(x, (list, tuple, ListConfig)) and len(x) == 2 and all(number(0, 1, open_high=True)(b) is None for b in x)
    return None if ok else "must be two numbers in [0, 1), e.g. [0.9,0.95]"


RULES: dict[str, Callable[[Any], Optional[str]]] = {
    "seed": integer(0),
    "trainer.max_steps": integer(1, also=(-1,)),
    "trainer.max_epochs": optional(integer(1, also=(-1,))),
    "trainer.val_check_interval": optional(either(integer(1), number(0, 1, open_low=True),
                                                  says="must be an integer >= 1 (batches) or a fraction in (0, 1]")),
    "trainer.limit_val_batches": either(integer(0), number(0, 1), says="must be an integer >= 0 or a fraction in [0, 1]"),
    "trainer.num_sanity_val_steps": integer(-1),
    "trainer.log_every_n_steps": integer(1),
    "trainer.gradient_clip_val": optional(number(0)),
    "trainer.accumulate_grad_batches": integer(1),
    "trainer.num_nodes": integer(1),
    "optimizer.lr": number(0, open_low=True),
    "optimizer.weight_decay": number(0),
    "optimizer.betas": betas,
    "optimizer.warmup_steps": integer(0),
    "optimizer.min_lr_ratio": number(0, 1),
    "optimizer.decay_steps": optional(integer(1)),
    "optimizer.moment_dtype": choice("float32", "bfloat16", "8bit"),
    "optimizer.impl": choice("auto", *PEERS),
    "data.seq_len": integer(1),
    "data.batch_size": integer(1),
    "data.val_fraction": number(0, 1, open_low=True, open_high=True),
    "data.max_bytes": optional(integer(1)),
    "data.num_workers": integer(0),
    "model.vocab_size": integer(1),
    "model.d_model": integer(1),
    "model.n_layers": integer(1),
    "model.n_heads": integer(1),
    "model.n_experts": integer(1),
    "model.top_k": integer(1),
    "model.d_ff": integer(1),
    "model.moe_every": integer(1),
    "model.capacity_factor": optional(number(0, open_low=True)),
    "model.score_func": choice("softmax", "sigmoid"),
    "model.n_shared_experts": integer(0),
    "model.aux_loss_coef": number(0),
    "model.aux_loss_scope": choice("micro_batch", "global"),
    "model.z_loss_coef": number(0),
    "model.bias_update_rate": number(0),
    "model.norm_topk_prob": optional(choice(True, False)),
    "model.routed_scaling_factor": number(0, open_low=True),
    "model.n_groups": integer(1),
    "model.topk_groups": integer(1),
    "model.router_jitter": number(0, 1, open_high=True),
    "model.init_std": optional(number(0, open_low=True)),
    "model.init_depth_scaled": choice(True, False),
    "model.token_buckets": optional(integer(0)),
    "model.max_seq_len": integer(1),
    "model.positions": choice("rope", "learned"),
    "model.expert_parallel": integer(1),
}


def _shown(value: Any) -> str:
    return str(value) if not isinstance(value, str) else value


def check_required(cfg: DictConfig) -> None:
    """A recipe's ``required:`` keys (key: what to give) and every ``???`` value must be set."""
    for key, what in (cfg.get("required") or {}).items():
        if OmegaConf.select(cfg, str(key)) in (None, ""):
            raise UsageError(f"recipe={cfg.recipe} needs {key}=<{what}>")
    missing = sorted(OmegaConf.missing_keys(cfg))
    if "data.path" in missing:
        raise UsageError("data=text needs data.path=<a text file or a directory of text files>")
    if missing:
        raise UsageError(f"{missing[0]} has no value: give {missing[0]}=<value>")


def validate(cfg: DictConfig, recipe: Optional[DictConfig] = None) -> None:
    """Check every documented key's type and range, and how keys fit together; ``recipe`` (the
    recipe's config before the command line) supplies the value each message points back to."""
    check_required(cfg)
    for key, rule in RULES.items():
        if OmegaConf.select(cfg, key, default="__absent__") == "__absent__":
            continue
        value = OmegaConf.select(cfg, key)
        problem = rule(value)
        if problem is not None:
            was = None if recipe is None else OmegaConf.select(recipe, key, default=None)
            hint = f" (the recipe's value: {_shown(was)})" if was is not None and was != value else ""
            raise UsageError(f"{key}={_shown(value)} {problem}{hint}")
    model, trainer = cfg.model, cfg.trainer
    if model.get("top_k") is not None and model.get("n_experts") is not None and model.top_k > model.n_experts:
        raise UsageError(f"model.top_k={model.top_k} is more than model.n_experts={model.n_experts}")
    if model.get("n_groups") and model.get("n_experts") and model.n_experts % model.n_groups:
        raise UsageError(f"model.n_groups={model.n_groups} must divide model.n_experts={model.n_experts}")
    check_expert_parallel(cfg)
    check_peer(cfg)
    check_moments(cfg)
    if model.get("d_model") and model.get("n_heads") and model.d_model % model.n_heads:
        raise UsageError(f"model.d_model={model.d_model} must be a multiple of model.n_heads={model.n_heads}")
    if model.get("max_seq_len", cfg.data.seq_len) < cfg.data.seq_len:
        raise UsageError(f"data.seq_len={cfg.data.seq_len} is longer than model.max_seq_len={model.max_seq_len}")
    if trainer.get("max_steps") == -1 and trainer.get("max_epochs") in (-1, None):
        raise UsageError("trainer.max_steps=-1 and trainer.max_epochs=-1 would train forever: set one of them")
    check_types("model", cfg.model, cfg.model.get("_target_"), recipe)
    check_types("optimizer", cfg.optimizer, cfg.model.get("_target_"), recipe)  # optimizer keys go to the model
    check_types("data", cfg.data, cfg.data.get("_target_"), recipe)
    if cfg.precision.name in ("bf16-master", "16-master"):
        check_types("precision", cfg.precision, "lightning_mp.MasterWeightPrecision", recipe)


def check_peer(cfg: DictConfig) -> None:
    """A peer's AdamW (``optimizer.impl``) steps bf16 weights itself: precision=bf16-true, FP32
    moments, and its package installed."""
    impl = cfg.optimizer.get("impl", "auto")
    if impl == "auto":
        return
    if cfg.precision.name != "bf16-true":
        raise UsageError(f"optimizer.impl={impl} steps bf16 weights itself: use it with precision=bf16-true "
                         f"(not {cfg.precision.name})")
    if cfg.optimizer.get("moment_dtype", "float32") != "float32":
        raise UsageError(f"optimizer.impl={impl} keeps its own moments: leave optimizer.moment_dtype=float32")
    module, package = REQUIRES[impl]
    if importlib.util.find_spec(module) is None:
        raise UsageError(f"optimizer.impl={impl} needs {package}: pip install {package}")


def check_moments(cfg: DictConfig) -> None:
    """bf16 or 8-bit moments (``optimizer.moment_dtype``) are lightning-mp's AdamW, which steps
    FP32 weights or 16-bit ones with FP32 values: not those of ``precision=bf16-true``."""
    moments, precision = cfg.optimizer.get("moment_dtype", "float32"), cfg.precision.name
    if moments != "float32" and precision in CANNOT_STEP:
        raise UsageError(f"optimizer.moment_dtype={moments} needs lightning-mp's AdamW, which cannot step "
                         f"precision={precision} ({CANNOT_STEP[precision]}): use precision=bf16-master, "
                         "16-master, bf16-mixed or 32-true")


def check_expert_parallel(cfg: DictConfig) -> None:
    """``model.expert_parallel=ep`` must divide the experts and the processes, under trainer=fsdp2."""
    from lightning_mp.cli.components import strategy_kind

    ep = cfg.model.get("expert_parallel") or 1
    if ep == 1:
        return
    if cfg.model.get("n_experts") and cfg.model.n_experts % ep:
        raise UsageError(f"model.expert_parallel={ep} must divide model.n_experts={cfg.model.n_experts}")
    if strategy_kind(cfg.trainer.get("strategy")) != "fsdp2":
        raise UsageError(f"model.expert_parallel={ep} needs trainer=fsdp2 (ModelParallelStrategy)")
    devices, nodes = cfg.trainer.get("devices"), cfg.trainer.get("num_nodes") or 1
    if isinstance(devices, int) and (devices * nodes) % ep:
        raise UsageError(f"model.expert_parallel={ep} must divide the {devices * nodes} processes "
                         f"(trainer.devices={devices} x trainer.num_nodes={nodes})")


def check_types(group: str, node: DictConfig, target: Optional[str], recipe: Optional[DictConfig] = None) -> None:
    """Compare each value with the type of ``target``'s default for that argument (``model.d_model=abc``)."""
    if target is None:
        return
    try:
        params = inspect.signature(get_object(target)).parameters
    except (ImportError, AttributeError, ValueError, TypeError) as err:
        raise UsageError(f"{group}._target_={target}: {first_line(err)}") from err
    for key, value in node.items():
        param = params.get(str(key))
        if param is None or param.default is inspect.Parameter.empty or param.default is None or value is None:
            continue
        expected = type(param.default)
        ok = isinstance(value, expected) and not (expected is int and isinstance(value, bool))
        if expected is float:
            ok = _number(value)
        if expected in (int, float, bool, str) and not ok:
            kind = {int: "an integer", float: "a number", bool: "true or false", str: "a string"}[expected]
            was = None if recipe is None else OmegaConf.select(recipe, f"{group}.{key}", default=None)
            hint = f" (the recipe's value: {_shown(was)})" if was is not None else ""
            raise UsageError(f"{group}.{key}={_shown(value)} must be {kind}{hint}")


def first_line(err: BaseException) -> str:
    """The innermost cause's message, one line (Hydra and Lightning wrap the error that names the value)."""
    while err.__cause__ is not None:
        err = err.__cause__
    text = str(err).strip()
    return f"{type(err).__name__}: {text.splitlines()[0] if text else repr(err)}"


# -- the corpus ---------------------------------------------------------------------------------


def check_data(datamodule: Any) -> None:
    """Read the corpus now: a missing, empty or binary path, or splits too small, are one line before training."""
    if getattr(datamodule, "files", None) is None:
        return
    try:
        datamodule.setup("fit")  # reads the corpus once (fit would): a split too small to train on is found here
    except (FileNotFoundError, ValueError, OSError) as err:
        raise UsageError(f"data.path={datamodule.path}: {err}" if datamodule.path else f"data: {err}") from err
