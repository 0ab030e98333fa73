"""What ``lightning-mp-train`` checks before it trains: each mistake becomes one line naming the key or file.

The checks run on the composed config (types and ranges of every documented key, the corpus,
the checkpoint to resume from) so that nothing fails after minutes of training, or as a
traceback from deep inside Lightning.
"""

from __future__ import annotations

import importlib.util
import inspect
import math
import pickle
import zipfile
from pathlib import Path
from typing import Any, Callable, Optional

import torch
from torch import Tensor
from hydra.utils import get_object
from omegaconf import DictConfig, ListConfig, OmegaConf

from lightning_mp import loading
from lightning_mp.optim.peers import PEERS, REQUIRES


class UsageError(Exception):
    """A mistake in the run's configuration: reported in one line, exit status 2."""


LAST_CHECKPOINT = Path("checkpoints", "last.ckpt")  # in a run directory (conf/callbacks/default.yaml)

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


# -- the corpus and the checkpoints ---------------------------------------------------------------


def check_data(datamodule: Any) -> None:
    """Read the corpus now: a missing, empty or binary path, or splits too small, are one line before training."""
    if getattr(datamodule, "files", None) is None:
        return
    try:
        datamodule.setup("fit")  # reads the corpus once (fit would): a split too small to train on is found here
    except (FileNotFoundError, ValueError, OSError) as err:
        raise UsageError(f"data.path={datamodule.path}: {err}" if datamodule.path else f"data: {err}") from err


def checkpoint_path(cfg: DictConfig) -> Optional[str]:
    """The checkpoint ``resume=<run dir>`` or ``ckpt_path=<file>`` names (``~`` expanded), checked to exist."""
    if cfg.ckpt_path and cfg.resume:
        raise UsageError("give either ckpt_path=<file> or resume=<run dir>, not both")
    if cfg.get("init_from") and (cfg.ckpt_path or cfg.resume):
        raise UsageError(
            "init_from starts a new run from a checkpoint's weights, resume and ckpt_path continue the "
            "checkpoint's run (optimizer, schedule and step too): give one of them"
        )
    if cfg.resume:
        path = Path(str(cfg.resume)).expanduser()
        if not is_checkpoint(path / LAST_CHECKPOINT):
            what = (f"no {LAST_CHECKPOINT} in that run directory" if path.is_dir() else
                    "a file: resume takes a run directory, ckpt_path a checkpoint file" if path.is_file() else
                    "no such directory")
            raise UsageError(f"resume={cfg.resume}: {what}")
        return str((path / LAST_CHECKPOINT).resolve())  # through a `latest` link: the run it names now
    if cfg.ckpt_path:
        path = Path(str(cfg.ckpt_path)).expanduser()
        if not is_checkpoint(path):
            raise UsageError(f"ckpt_path={cfg.ckpt_path}: no such file (nor a distributed checkpoint's directory)")
        return str(path.resolve())
    return None


def is_distributed(path: Path) -> bool:
    """A distributed (DCP) checkpoint: the directory Lightning's ``ModelParallelStrategy`` writes
    (``save_distributed_checkpoint=True``), its tensors in shards and the rest in ``meta.pt``."""
    return path.is_dir() and (path / "meta.pt").is_file()


def is_checkpoint(path: Path) -> bool:
    return path.is_file() or is_distributed(path)


def init_from_path(cfg: DictConfig) -> Optional[Path]:
    """The checkpoint file ``init_from`` names: a ``.ckpt`` file, or a run directory's :data:`LAST_CHECKPOINT`."""
    if not cfg.get("init_from"):
        return None
    path = Path(str(cfg.init_from)).expanduser()
    if path.is_dir() and not is_distributed(path):
        path = path / LAST_CHECKPOINT
    if not is_checkpoint(path):
        raise UsageError(f"init_from={cfg.init_from}: no such checkpoint file (a run directory needs {LAST_CHECKPOINT})")
    return path.resolve()


def read_checkpoint(path: Path, key: str, trust: bool = False) -> dict[str, Any]:
    """A Lightning checkpoint's contents, or one line saying why the file is not one (``key`` names
    the option). A distributed checkpoint's ``state_dict`` holds meta tensors: names and shapes.
    Only plain data is loaded (tensors, containers): a file that holds more is refused before
    anything in it runs, unless ``trust`` (``trust_checkpoint=true``)."""
    errors = (pickle.UnpicklingError, RuntimeError, EOFError, zipfile.BadZipFile, ValueError, OSError, AttributeError)
    distributed = is_distributed(path)
    try:
        if distributed:
            return {**loading.load(path / "meta.pt", trust=trust, opt_in="trust_checkpoint=true"),
                    "state_dict": _shapes(path)}
        checkpoint = loading.load(path, trust=trust, opt_in="trust_checkpoint=true", mmap=True)
    except loading.UnsafeCheckpointError as err:  # (an UnpicklingError: before the general case)
        raise UsageError(f"{key}={err}") from None
    except errors as err:
        kind = "a distributed checkpoint" if distributed else "a Lightning checkpoint"
        raise UsageError(f"{key}={path}: not {kind}, or a truncated one ({_why(err)})") from err
    if not isinstance(checkpoint, dict) or "state_dict" not in checkpoint:
        raise UsageError(f"{key}={path}: not a Lightning checkpoint (no state_dict)")
    return checkpoint


def _shapes(path: Path) -> dict[str, Tensor]:
    """The model weights of a distributed checkpoint, as meta tensors (names, shapes, dtypes: no data read)."""
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    entries = FileSystemReader(str(path)).read_metadata().state_dict_metadata
    prefix = "state_dict."
    return {
        key[len(prefix):]: torch.empty(entry.size, dtype=entry.properties.dtype, device="meta")
        for key, entry in entries.items()
        if key.startswith(prefix) and isinstance(entry, TensorStorageMetadata)
    }


def load_weights(model: Any, path: Path, checkpoint: dict[str, Any]) -> None:
    """Load a checkpoint's weights into ``model`` (configured): those of ``checkpoint``, what
    :func:`read_checkpoint` gave for ``path``, or for a distributed checkpoint (whose
    ``state_dict`` there holds shapes only) its shards read whole into this process."""
    if not is_distributed(path):
        model.load_state_dict(checkpoint["state_dict"])
        return
    import torch.distributed.checkpoint as dcp

    state = model.state_dict()
    dcp.load({"state_dict": state}, checkpoint_id=str(path))  # in place, into the model's tensors
    model.load_state_dict(state)


def _why(err: BaseException) -> str:
    """torch.load's reason, without its advice about ``mmap`` (which only says it is not a zip archive)."""
    text = first_line(err)
    return "not a torch.save archive" if "mmap can only be used" in text or isinstance(err, zipfile.BadZipFile) else text


def check_fits(model: Any, state: dict[str, Any], path: Path, key: str) -> None:
    """The checkpoint's weights must be this model's: same names, same shapes."""
    model.configure_model()
    own = model.state_dict()
    problems = [f"missing {k}" for k in own.keys() - state.keys()]
    problems += [f"unexpected {k}" for k in state.keys() - own.keys()]
    problems += [
        f"{k} is {tuple(state[k].shape)}, the model's {tuple(own[k].shape)}"
        for k in own.keys() & state.keys()
        if own[k].shape != state[k].shape
    ]
    if problems:
        shown = "; ".join(sorted(problems)[:3]) + (f"; and {len(problems) - 3} more" if len(problems) > 3 else "")
        raise UsageError(f"{key}={path}: its weights do not fit this model ({shown}): use the model options it was trained with")


def check_resume(model: Any, path: str, cfg: DictConfig) -> None:
    """A checkpoint to continue must load, fit the model, and leave steps to train."""
    key = "resume" if cfg.resume else "ckpt_path"
    checkpoint = read_checkpoint(Path(path), key, trust=cfg.get("trust_checkpoint", False))
    check_fits(model, checkpoint["state_dict"], Path(path), key)
    done, limit = int(checkpoint.get("global_step", 0)), cfg.trainer.max_steps
    if limit != -1 and done >= limit:
        raise UsageError(f"{key}={cfg.resume or cfg.ckpt_path}: that run already trained {done} steps, "
                         f"trainer.max_steps={limit}: raise trainer.max_steps to train on")
