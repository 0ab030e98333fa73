"""Ready experiments for lightning-mp-train (installed as ``lightning_mp.recipe``; chosen with ``recipe=<name>``)."""
