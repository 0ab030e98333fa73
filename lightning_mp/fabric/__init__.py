"""Lightning Fabric: ``lightning_mp.Fabric`` and its ``MasterWeightPrecision`` (hand-written loops, litgpt)."""

from lightning_mp.fabric.fabric import Fabric
from lightning_mp.fabric.fsdp2 import FSDP2MasterWeightPrecision
from lightning_mp.fabric.precision import MasterWeightPrecision

__all__ = ["FSDP2MasterWeightPrecision", "Fabric", "MasterWeightPrecision"]
