"""``precision_plugin()``: the precision plugin for any name, lightning-mp's or Lightning's."""

from __future__ import annotations

from typing import Any, Optional, get_args

import torch
from lightning.pytorch.plugins.precision import DoublePrecision, FSDPPrecision, HalfPrecision, MixedPrecision, Precision

from lightning_mp.precision.fsdp import FSDPMasterWeightPrecision
from lightning_mp.precision.fsdp2 import FSDP2MasterWeightPrecision
from lightning_mp.precision.master import MasterWeightPrecision
from lightning_mp.precision.options import MASTER_DTYPES

_LIGHTNING_ALIASES = {"64": "64-true", "32": "32-true", "16": "16-mixed", "bf16": "bf16-mixed"}
PRECISION_NAMES: tuple[str, ...] = (
    "32-true",
    "64-true",
    "bf16-mixed",
    "16-mixed",
    "bf16-true",
    "16-true",
    "bf16-master",
    "16-master",
)


def precision_plugin(
    name: str, *, device: Optional[str] = None, strategy: Optional[str] = None, **kwargs: Any
) -> Precision:
    """The precision plugin for any name, lightning-mp's or Lightning's.

    ``"bf16-master"`` and ``"16-master"`` give :class:`MasterWeightPrecision` (``kwargs`` go to
    it); Lightning's names (``"32-true"``, ``"bf16-mixed"``, ``"16-mixed"``, ``"bf16-true"``,
    ``"16-true"``, ``"64-true"`` and the aliases ``"32"``, ``"16"``, ``"bf16"``, ``"64"``) give
    the plugin that ``Trainer(precision=name)`` builds. ``device`` is the autocast device type
    (default: ``"cuda"`` when available, else ``"cpu"``). ``strategy="fsdp"`` gives the plugins
    Lightning's ``FSDPStrategy`` accepts: :class:`FSDPMasterWeightPrecision` for ours (``kwargs``:
    ``keep_fp32`` classes), Lightning's ``FSDPPrecision`` for the others. ``strategy="fsdp2"``
    (``ModelParallelStrategy``) gives :class:`FSDP2MasterWeightPrecision` for ours, Lightning's own
    plugins for the others (``MoEModule`` then shards itself with FP32 units).
    """
    name = _LIGHTNING_ALIASES.get(str(name), str(name))
    if strategy == "fsdp2" and name in MASTER_DTYPES:
        return FSDP2MasterWeightPrecision(name, device=device, **kwargs)  # type: ignore[arg-type]
    # (fsdp2 with Lightning's names: Lightning's own plugins, as it picks them for ModelParallelStrategy)
    if strategy == "fsdp":
        if name in MASTER_DTYPES:
            return FSDPMasterWeightPrecision(name, device=device, **kwargs)  # type: ignore[arg-type]
        if kwargs:
            raise TypeError(f"precision {name!r} takes no options, got {sorted(kwargs)}")
        return FSDPPrecision(name)  # type: ignore[arg-type]
    if strategy not in (None, "ddp", "auto", "single_device", "fsdp2"):
        raise ValueError(f"strategy must be None, 'ddp', 'fsdp' or 'fsdp2' (the plugin differs only for FSDP), got {strategy!r}")
    if name in MASTER_DTYPES:
        return MasterWeightPrecision(name, device=device, **kwargs)  # type: ignore[arg-type]
    if name not in PRECISION_NAMES:
        raise ValueError(f"Unknown precision {name!r}; choose one of {', '.join(PRECISION_NAMES)}.")
    if kwargs:
        raise TypeError(f"precision {name!r} takes no options, got {sorted(kwargs)}")
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if name == "32-true":
        return Precision()
    if name == "64-true":
        return DoublePrecision()
    if name in ("bf16-true", "16-true"):
        return HalfPrecision(name)  # type: ignore[arg-type]
    if name == "16-mixed" and not fp16_supported(device):
        # Trainer(precision="16-mixed") would silently run bf16-mixed on a CPU: say so instead
        raise ValueError(f"precision '16-mixed' needs fp16 autocast, which {device} lacks here: use 'bf16-mixed'")
    return MixedPrecision(name, device)  # type: ignore[arg-type]


def fp16_supported(device_type: str) -> bool:
    """Whether an fp16 matmul runs under autocast on this device type (torch's CPU autocast has
    fp16 since 2.4; Lightning's ``Trainer(precision="16-mixed")`` still runs bf16 there)."""
    try:
        x = torch.ones(8, 8, device=device_type)
        with torch.autocast(device_type, dtype=torch.float16):
            return (x @ x).dtype == torch.float16
    except (RuntimeError, AssertionError):
        return False


def with_master_plugin(precision: Any, plugins: Any, base: type, build: Any) -> tuple[Any, Any]:
    """``(plugins, precision)`` for Lightning's ``Trainer`` or ``Fabric``: for a lightning-mp name
    (``bf16-master``, ``16-master``), ``plugins`` plus ``build(name)`` and no precision name (a
    precision plugin in ``plugins`` besides, an instance of ``base``, is refused); for a name neither
    accepts, a one-line error naming both's; else both unchanged."""
    if precision is None or str(precision) not in MASTER_DTYPES:
        known = _lightning_names()
        if precision is not None and known is not None and str(precision) not in known:
            # (Lightning's own message would list its names only)
            raise ValueError(f"Precision {str(precision)!r} is invalid: lightning-mp's are {', '.join(map(repr, MASTER_DTYPES))}; "
                             f"Lightning's {', '.join(map(repr, known))}")
        return plugins, precision
    given = plugins if isinstance(plugins, (list, tuple)) else [] if plugins is None else [plugins]
    if any(isinstance(p, base) for p in given):
        raise ValueError(f"precision={precision!r} and a precision plugin in plugins: give one of them")
    return [*given, build(str(precision))], None


def _lightning_names() -> Optional[list[str]]:
    """The precision names Lightning's Trainer and Fabric accept, from its connector's type (``None``
    where a Lightning release has moved it: Lightning then checks the name itself)."""
    try:
        from lightning.fabric.connector import _PRECISION_INPUT
    except ImportError:
        return None
    names = list(dict.fromkeys(str(name) for literal in get_args(_PRECISION_INPUT) for name in get_args(literal)))
    return [n for n in names if "-" in n] + [n for n in names if "-" not in n]  # the full names, then the aliases
