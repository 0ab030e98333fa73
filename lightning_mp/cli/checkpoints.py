"""The checkpoints ``lightning-mp-train`` is given (``resume``, ``ckpt_path``, ``init_from``): found,
read as data only, and checked to fit the model before it trains; each mistake one line."""

from __future__ import annotations

import pickle
import zipfile
from pathlib import Path
from typing import Any, Optional

import torch
from torch import Tensor
from omegaconf import DictConfig

from lightning_mp import loading
from lightning_mp.cli.checks import UsageError, first_line

LAST_CHECKPOINT = Path("checkpoints", "last.ckpt")  # in a run directory (conf/callbacks/default.yaml)


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
