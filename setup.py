"""Package metadata for ablate_jax."""

from setuptools import find_packages, setup

setup(
    name="ablate_jax",
    version="0.1.0",
    description="Concept ablation for text-to-image diffusion models (Kumari et al., 2023) in JAX/Flax.",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.10",
    packages=find_packages(include=["ablate_jax", "ablate_jax.*"]),
    include_package_data=True,
    package_data={"ablate_jax": ["prompts/*.txt", "prompts/eval/*.txt", "toy/assets/*/*", "toy/assets/*/*/*"]},
    install_requires=[
        "jax>=0.10.2",
        "flax>=0.12.8",
        "optax>=0.2.8",
        "orbax-checkpoint>=0.12.8",
        "ml_collections>=1.1.0",
        "clu>=0.0.12",
        "numpy>=2.0",
        "transformers>=5.24.0",
        "tokenizers>=0.23.3",
        "safetensors>=0.8.0",
        "huggingface_hub>=2.4.0",
        "etils[epath]>=1.15.0",
        "fsspec>=2026.9.0",
        "tensorflow-cpu>=2.21.0",
        "tensorboard>=2.21.0",  # clu's metric writers import it
        "tensorflow-datasets>=4.9.10",
        "array_record>=0.8.6",
        "pillow>=13.0.0",
        "tqdm>=4.70.1",
    ],
    extras_require={
        # torch is pinned to the CPU build this project is tested with: it is only the
        # reference the tests compare against and the export target, never used to train.
        # gcsfs and the storage emulator stand in for Cloud Storage in the gs:// work directory tests.
        "test": ["pytest>=9.2.0", "pytest-xdist>=3.8.0", "ruff>=0.17.6", "import-linter>=2.16", "torch==2.13.0", "diffusers>=0.42.1", "gcsfs>=2026.10.1",
                 "gcp-storage-emulator>=2026.7.19"],
        "bench": ["torch==2.13.0", "diffusers>=0.42.1", "matplotlib>=3.11.2"],
    },
    entry_points={
        "console_scripts": [
            "ablate-jax-train=ablate_jax.train:cli",
        ],
    },
)
