"""What pyproject.toml cannot say: the package list, computed, with two top-level folders installed under
lcr_fast (the Triton kernels and the YAML configs), so that they cannot clash with other distributions'
and an installed package can name the paper's settings (``-c byol_cub200``); the CPU operator's C++ source
ships with the kernels, which build it on first use."""
from setuptools import find_packages, setup

setup(
    packages=find_packages(include=["lcr_fast", "lcr_fast.*"]) + ["lcr_fast.kernels", "lcr_fast.kernels.cpu",
                                                                   "lcr_fast.configs"],
    package_dir={"lcr_fast.kernels": "kernels", "lcr_fast.configs": "configs"},
    package_data={"lcr_fast.configs": ["*.yaml"], "lcr_fast.kernels.cpu": ["*.cpp"]},
)
