"""medjax: Stable Diffusion in JAX/Flax, adapted to medical imaging."""
import re
from pathlib import Path

from setuptools import find_packages, setup

_version = re.search(r'__version__ = "([^"]+)"', Path("medjax/__init__.py").read_text()).group(1)

setup(
    name="medjax",
    version=_version,
    description="Stable Diffusion in JAX/Flax for medical imaging: load diffusers weights, "
                "train textual inversion and U-Nets on meshes, evaluate with FID and AUC.",
    long_description=Path("README.md").read_text(),
    long_description_content_type="text/markdown",
    packages=find_packages(include=["medjax", "medjax.*"]),
    # the embedded model's phantom-trained weights (4.6 MB; configs/embedded_pretrain.py)
    package_data={"medjax": ["weights/*.safetensors"]},
    python_requires=">=3.11",  # current jax needs 3.11+; CI tests 3.11 (README "Set up")
    install_requires=[
        "jax>=0.4.35",
        "flax>=0.10.0",
        "optax>=0.2.3",
        "orbax-checkpoint>=0.6.0",
        "ml_collections>=0.1.1",
        "absl-py>=2.0",
        "numpy>=1.26",
        "ml_dtypes>=0.4",
        "safetensors>=0.4.3",  # its NumPy path reads/writes bf16 (ml_dtypes) from 0.4.1 on
        "huggingface_hub>=0.23",  # Hugging Face ids from the local cache (transformers brings it)
        "transformers>=4.44",  # CLIPTokenizer only; no torch needed
        "tqdm>=4.66",
        "Pillow>=10.0",
        "scipy>=1.10",
        "grain>=0.2.18",
        "tensorboardX>=2.6",  # TensorBoard event files without TensorFlow (clu's writer needs TF)
    ],
    extras_require={
        # PyTorch oracles for parity tests and benchmarks. torch/torchvision are pinned as a
        # matching pair (our CI machines carry both wheels; PyPI's torchvision fails to load
        # beside a different torch build). diffusers/transformers, pytorch-fid, torchmetrics,
        # scikit-learn and scikit-image are the references.
        "test": [
            "pytest>=8.0",
            "ftfy>=6.1",  # open_clip's SimpleTokenizer (the tokenizer oracle) imports ftfy and regex
            "regex>=2023.0",
            "ruff>=0.6",  # lint: ruff check medjax configs launch (ruff.toml)
            "torch==2.14.1",
            "torchvision==0.29.1",
            "diffusers>=0.42",
            "transformers>=5.0",
            "pytorch-fid>=0.3",
            "torchmetrics>=1.4",
            "scikit-learn>=1.3",
            "scikit-image>=0.22",
            "pydicom>=3.0",
            "nibabel>=5.0",
            "SimpleITK>=2.3",
        ],
        # Medical image IO (DICOM, NIfTI, MHA) for the data loaders.
        "io": ["pydicom>=3.0", "nibabel>=5.0", "SimpleITK>=2.3"],
    },
    entry_points={"console_scripts": []},
)
