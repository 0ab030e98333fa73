"""C++ sources of the fused optimizer step (built at first use by lightning_mp.fused)."""
