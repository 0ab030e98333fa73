"""lightning-mp's Hydra config groups (installed as ``lightning_mp.conf``)."""
