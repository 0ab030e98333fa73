"""The peers' cheap AdamW, to train side by side with lightning-mp's: ``optimizer.impl`` on the
command line, ``MoEModule(optimizer_impl=...)`` in Python.

Each steps bf16 weights itself (``precision="bf16-true"``), with no FP32 copy:

- ``torchao-adamw``: torchao's ``_AdamW(bf16_stochastic_round=True)``, moments in the weights'
  dtype (bf16: 4 bytes per parameter) and the weight stochastically rounded to bf16;
- ``torchao-adamw8bit``: torchao's ``AdamW8bit(bf16_stochastic_round=True)``, block-wise 8-bit
  moments (about 2 bytes per parameter);
- ``optimi-adamw``: torch-optimi's ``AdamW(kahan_sum=True)``, bf16 moments and a bf16 Kahan
  compensation (6 bytes per parameter); its weight decay is a separate bf16 multiply, outside the
  compensation.

They are optional (``pip install torchao torch-optimi``, torch pinned to the installed version).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, Callable

from torch.optim import Optimizer

PEERS = ("torchao-adamw", "torchao-adamw8bit", "optimi-adamw")
# what each imports, and the pip package that holds it
REQUIRES = {"torchao-adamw": ("torchao", "torchao"), "torchao-adamw8bit": ("torchao", "torchao"),
            "optimi-adamw": ("optimi", "torch-optimi")}


def _torchao(name: str) -> Callable[..., Optimizer]:
    from torchao.optim import AdamW8bit, _AdamW

    cls = AdamW8bit if name == "torchao-adamw8bit" else _AdamW
    return lambda groups, **kw: cls(groups, **kw, bf16_stochastic_round=True)


def _optimi(name: str) -> Callable[..., Optimizer]:
    from optimi import AdamW

    # optimi's eps default is 1e-6; torch's (and torchao's) 1e-8. Weight decay lr * weight_decay,
    # as torch's AdamW.
    return lambda groups, **kw: AdamW(groups, **kw, kahan_sum=True, eps=1e-8)


def adamw(name: str, groups: Iterable[dict[str, Any]], lr: float, betas: tuple[float, float]) -> Optimizer:
    """The peer AdamW ``name`` (one of :data:`PEERS`) over ``groups``, each group's weight decay kept."""
    if name not in PEERS:
        raise ValueError(f"optimizer_impl={name!r} is not one of auto, {', '.join(PEERS)}")
    try:
        make = _optimi(name) if name.startswith("optimi") else _torchao(name)
    except ImportError:
        raise ImportError(f"optimizer_impl={name} needs {REQUIRES[name][1]}: pip install {REQUIRES[name][1]}") from None
    return make(list(groups), lr=lr, betas=tuple(betas))
