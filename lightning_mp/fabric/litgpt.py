"""``lightning-mp-litgpt``: litgpt's command line, which then also takes ``--precision bf16-master``.

    lightning-mp-litgpt finetune_full checkpoints/<model> --precision bf16-master [litgpt's options]

litgpt's scripts build ``lightning.Fabric(precision=...)`` themselves. This command runs litgpt's
own CLI with ``lightning.Fabric`` replaced by :class:`lightning_mp.Fabric`, which takes
``bf16-master`` and ``16-master`` (every other precision goes to Lightning unchanged); nothing
else of litgpt changes. A script whose ``precision`` litgpt annotates with a closed list of names
(``pretrain``: ``Literal["bf16-true", "bf16-mixed", "32-true", None]``) gets the two names added to
that list, or its command-line parser would refuse them. One device or DDP: with several devices
litgpt's ``finetune_full`` and ``pretrain`` build Fabric's FSDP strategy, which takes only FSDP
precision plugins.
"""

from __future__ import annotations

import typing
from typing import Any, Callable, Literal, Optional

from lightning_mp.precision.options import MASTER_DTYPES


def main() -> None:
    import lightning

    from lightning_mp.fabric import Fabric

    try:
        from litgpt.__main__ import PARSER_DATA
        from litgpt.__main__ import main as litgpt_main
    except ImportError:
        raise SystemExit("lightning-mp-litgpt needs litgpt: pip install litgpt") from None
    lightning.Fabric = Fabric  # litgpt reads lightning.Fabric when a script runs: this process only
    for script in PARSER_DATA.values():
        accept_master_precisions(script)
    litgpt_main()


def accept_master_precisions(script: Callable[..., Any]) -> None:
    """Add ``bf16-master`` and ``16-master`` to ``script``'s ``precision`` annotation where it is a
    ``Literal`` (optionally ``Optional``) of names; any other annotation is left as it is."""
    try:
        hints = typing.get_type_hints(script)
    except Exception:  # (an annotation litgpt's own parser would resolve its own way)
        return
    names = _literal_names(hints.get("precision"))
    if names is not None and not set(MASTER_DTYPES) <= set(names):
        widened = Literal[tuple(dict.fromkeys([*names, *MASTER_DTYPES]))]  # type: ignore[valid-type]
        script.__annotations__["precision"] = Optional[widened]


def _literal_names(annotation: Any) -> Optional[tuple[Any, ...]]:
    """The values of the ``Literal`` in ``annotation`` (alone or in a ``Union``/``Optional``)."""
    if typing.get_origin(annotation) is Literal:
        return typing.get_args(annotation)
    if typing.get_origin(annotation) is typing.Union:
        for arg in typing.get_args(annotation):
            if typing.get_origin(arg) is Literal:
                return typing.get_args(arg)
    return None
