"""``lightning-mp-litgpt``: litgpt's command line, which then also takes ``--precision bf16-master``.

    lightning-mp-litgpt finetune_full checkpoints/<model> --precision bf16-master [litgpt's options]

litgpt's scripts build ``lightning.Fabric(precision=...)`` themselves. This command runs litgpt's
own CLI with ``lightning.Fabric`` replaced by :class:`lightning_mp.Fabric`, which takes
``bf16-master`` and ``16-master`` (every other precision goes to Lightning unchanged); nothing
else of litgpt changes. One device or DDP: with several devices litgpt's ``finetune_full`` and
``pretrain`` build Fabric's FSDP strategy, which takes only FSDP precision plugins.
"""

from __future__ import annotations


def main() -> None:
    import lightning

    from lightning_mp.fabric import Fabric

    try:
        from litgpt.__main__ import main as litgpt_main
    except ImportError:
        raise SystemExit("lightning-mp-litgpt needs litgpt: pip install litgpt") from None
    lightning.Fabric = Fabric  # litgpt reads lightning.Fabric when a script runs: this process only
    litgpt_main()
