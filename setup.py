from setuptools import find_packages, setup

setup(
    name="lcr-fast",
    version="0.1.0",
    description="High-throughput LCR (CVPR 2023) trainer: BYOL / MoCo v2 with a learned common rationale",
    python_requires=">=3.10",
    packages=find_packages(include=["lcr_fast", "lcr_fast.*"]) + ["lcr_fast.kernels"],
    # The Triton kernels live in the top-level kernels/ folder but install under lcr_fast so that
    # they cannot clash with any other distribution's "kernels" package.
    package_dir={"lcr_fast.kernels": "kernels"},
    install_requires=[
        "torch==2.14.1",
        "torchvision==0.29.1",
        "nvidia-dali-cuda130",
        "numba",  # the DALI CPU pipeline's colour step (a NumbaFunction operator)
        "deepspeed",
        "triton",
        "pyyaml",
        "tqdm",
        "tensorboard",
        "matplotlib",
    ],
    extras_require={"test": ["pytest"]},
    entry_points={"console_scripts": ["lcr-train=lcr_fast.train:cli", "lcr-eval=lcr_fast.eval.cli:main"]},
)
