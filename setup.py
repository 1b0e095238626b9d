"""simnpo-fast: fused, memory-frugal LLM unlearning (SimNPO, NPO, GA, GradDiff)."""
from setuptools import find_packages, setup

setup(
    name="simnpo-fast",
    version="0.1.0",
    description="Fused Triton / chunked-PyTorch SimNPO unlearning losses and a lean FSDP2 unlearning loop",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    # The Triton kernels live in the top-level kernels/ folder and are reached as simnpo_fast.kernels through the
    # committed symlink simnpo_fast/kernels -> ../kernels (wheels get real copies). kernels/ has no __init__.py on
    # purpose: from the repository root it is only a namespace portion, which Python ranks below any installed
    # regular package, so it can never shadow Hugging Face's `kernels` (tests/test_install.py).
    packages=find_packages(include=["simnpo_fast", "simnpo_fast.*"]) + ["simnpo_fast.kernels"],
    install_requires=[
        "torch>=2.4",
        "numpy",
        "pyyaml",
        "tqdm",
        "safetensors",
        "transformers>=4.46",
        "accelerate",  # transformers.Trainer needs it (HF drop-in)
        "tokenizers",
        "datasets",
        "scipy",
        "rouge-score",
        "matplotlib",
        "psutil",
        "triton; platform_system=='Linux'",
    ],
    extras_require={
        # the external check of the multiple-choice evaluation (tests/eval/test_mcq_lmeval.py) runs in `make test`
        "dev": ["pytest>=8", "pytest-benchmark", "pytest-timeout", "peft", "lm_eval==0.4.13"],
        "test-lmeval": ["lm_eval==0.4.13"],
        "bench": ["liger-kernel", "cut-cross-entropy", "matplotlib", "pytest-benchmark"],
        "gpu": ["flash-attn"],
        "lora": ["peft"],
    },
    package_data={"simnpo_fast": ["configs/*.yaml"]},
    entry_points={"console_scripts": ["simnpo-fast=simnpo_fast.cli:main"]},
)
