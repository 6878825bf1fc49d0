from setuptools import find_packages, setup

setup(
    name="lcr-fast",
    version="0.1.0",
    description="High-throughput LCR (CVPR 2023) trainer: BYOL / MoCo v2 with a learned common rationale",
    python_requires=">=3.10",
    packages=find_packages(include=["lcr_fast", "lcr_fast.*"]) + ["lcr_fast.kernels", "lcr_fast.configs"],
    # The Triton kernels and the YAML configs live in top-level folders but install under lcr_fast, so
    # that they cannot clash with other distributions' and an installed package can name the paper's
    # settings (``-c byol_cub200``).
    package_dir={"lcr_fast.kernels": "kernels", "lcr_fast.configs": "configs"},
    package_data={"lcr_fast.configs": ["*.yaml"]},
    install_requires=[
        "torch==2.14.1",
        "torchvision==0.29.1",
        "nvidia-dali-cuda130",
        "numba",  # the DALI CPU pipeline's colour step (a NumbaFunction operator)
        "deepspeed",
        "triton",
        "pyyaml",
        "tqdm",
        "scipy",  # torchvision's StanfordCars reads its .mat annotation files with it
        "tensorboard",
        "matplotlib",
    ],
    extras_require={"test": ["pytest", "ruff"]},
    entry_points={"console_scripts": ["lcr-train=lcr_fast.train:cli", "lcr-eval=lcr_fast.eval.cli:main",
                                      "lcr-prepare=lcr_fast.data.prepare:cli", "lcr-doctor=lcr_fast.doctor:cli",
                                      "lcr-export=lcr_fast.export:cli"]},
)
