"""The shipped YAML configs (the reference's own, MoCo ones, the demos), installed as ``lcr_fast.configs`` so
that an installed package can name them: ``lcr-train -c byol_cub200``."""
