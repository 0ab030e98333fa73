"""Lightning Fabric: ``lightning_mp.Fabric`` and its ``MasterWeightPrecision`` (hand-written loops, litgpt)."""

from lightning_mp.fabric.fabric import Fabric
from lightning_mp.fabric.precision import MasterWeightPrecision

__all__ = ["Fabric", "MasterWeightPrecision"]
