"""lcr-fast: a high-throughput trainer reproducing LCR (Shu et al., CVPR 2023)."""
__version__ = "0.1.0"
