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
    # Ranges for library users: the lower bounds are the oldest releases whose APIs the code uses (torch 2.6:
    # torch.distributed.fsdp.fully_shard; transformers 5: from_pretrained / from_config(dtype=)), the upper bounds
    # the next major releases, whose changes are untested. `make test` / `make demo` install the exact, hash-checked
    # set of requirements/cpu-py311.txt instead (`make lock` regenerates it from these ranges and
    # requirements/cpu.in); `make test-latest` tries the newest releases these ranges allow.
    install_requires=[
        "torch>=2.6,<3",
        "numpy>=1.24,<3",
        "pyyaml>=6,<7",
        "tqdm>=4.60,<5",
        "safetensors>=0.4,<1",
        "transformers>=5.0,<6",
        "accelerate>=1.0,<2",  # transformers.Trainer needs it (HF drop-in)
        "tokenizers>=0.21,<1",
        "datasets>=3.0,<6",
        "scipy>=1.10,<2",
        "rouge-score>=0.1.2,<0.2",
        "matplotlib>=3.7,<4",
        "psutil>=5.9,<8",
        "triton>=3.0,<4; platform_system=='Linux'",
    ],
    extras_require={
        # the external check of the multiple-choice evaluation (tests/eval/test_mcq_lmeval.py) runs in `make test`
        "dev": ["pytest>=8,<10", "pytest-benchmark>=4,<6", "pytest-timeout>=2,<3", "peft>=0.13,<1",
                "lm_eval==0.4.13"],
        "test-lmeval": ["lm_eval==0.4.13"],
        "bench": ["liger-kernel", "cut-cross-entropy", "matplotlib", "pytest-benchmark"],
        "gpu": ["flash-attn"],
        "lora": ["peft>=0.13,<1"],
    },
    package_data={"simnpo_fast": ["configs/*.yaml"]},
    entry_points={"console_scripts": ["simnpo-fast=simnpo_fast.cli:main"]},
)
