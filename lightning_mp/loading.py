"""Loading a checkpoint as data: tensors and plain containers, never code that came with the file.

A checkpoint is a pickle, and a pickle can name any callable to run while it loads (``os.system``
in a ``__reduce__``). torch's ``weights_only=True`` unpickler only rebuilds tensors, numbers,
strings and containers (and the types registered with ``torch.serialization.add_safe_globals``);
every path by which this package reads a checkpoint goes through :func:`load`, which uses it and
turns its refusal into one line naming the file, what it holds that is not plain data, and the
explicit opt-in for a file the user trusts. Checkpoints written by this package hold plain data
only and need no opt-in.
"""

from __future__ import annotations

import pickle
import re
from pathlib import Path
from typing import Any, Union

import torch


class UnsafeCheckpointError(pickle.UnpicklingError):
    """A checkpoint holds objects that loading would have to run code for; nothing in it ran."""


def load(path: Union[str, Path], *, trust: bool = False, opt_in: str = "weights_only=False", **kwargs: Any) -> Any:
    """``torch.load(path, weights_only=True, **kwargs)``, or with ``trust`` the unrestricted load.

    Raises :class:`UnsafeCheckpointError` (one line: the file, its first object that is not plain
    data, and ``opt_in``, the way to load it anyway) where the file holds more than plain data.
    """
    kwargs.setdefault("map_location", "cpu")
    if trust:
        return torch.load(path, weights_only=False, **kwargs)
    try:
        return torch.load(path, weights_only=True, **kwargs)
    except pickle.UnpicklingError as err:
        if "weights only load failed" not in str(err).lower():
            raise
        raise UnsafeCheckpointError(
            f"{path}: holds {_culprit(err)}, which is not plain data: loading it would run code that came with the "
            f"file, so nothing was loaded. If you trust the file, load it with {opt_in}"
        ) from None


def _culprit(err: Exception) -> str:
    """What torch's restricted unpickler stopped at, in a few words."""
    text = str(err)
    found = re.search(r"GLOBAL ([\w.]+)", text)  # "Unsupported global: GLOBAL x.y", "unsupported GLOBAL x.y whose module"
    if found:
        return f"a reference to {found.group(1)}"
    found = re.search(r"Unsupported operand (\d+)", text)
    if found:
        return f"a pickle instruction it does not allow (operand {found.group(1)})"
    reason = next((line.strip() for line in text.splitlines() if line.strip().startswith(("Unsupported", "Trying"))), "")
    return reason.rstrip(".")[:160] or "an object beyond tensors and plain containers"


def check(path: Union[str, Path], *, trust: bool = False, opt_in: str = "weights_only=False") -> None:
    """Refuse ``path`` (:class:`UnsafeCheckpointError`) where it is a file that holds more than plain
    data, before anything else reads it; without ``trust`` only. Not a file (Lightning's ``"last"``,
    a directory): nothing to check here."""
    if not trust and Path(str(path)).is_file():
        load(path, opt_in=opt_in)
