"""``python -m lightning_mp``: the same as ``lightning-mp-train``."""

from lightning_mp.cli import main

main()
