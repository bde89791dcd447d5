"""Distribution ``lfvila``: the LF-VILA model library (``lfvila``). It depends on ``lfvila-kernels``, the Triton
kernels, a distribution of their own in ``kernels/`` (``kernels/pyproject.toml``; torch and triton only), installed
first: ``pip install ./kernels`` then ``pip install .`` (the Makefile installs both editable).

The kernels live in ``kernels/lfvila_kernels/``, so the folder path matches the import name ``lfvila_kernels``. The
folder ``kernels/`` itself is no package (no ``__init__.py``): a package named ``kernels`` importable from the checkout
root would shadow Hugging Face's ``kernels`` distribution, which ``transformers`` imports when it probes for it, and
so load a second copy of our kernels that re-registers their ``torch.library`` ops over the first.
Install torch first, pinned (``make test`` does): an unpinned torch requirement pulls a multi-GB CUDA build.
"""

from setuptools import find_packages, setup

setup(
    name="lfvila",
    version="0.1.0",
    description="Fast LF-VILA: long-form video-language pre-training with fused Triton kernels",
    python_requires=">=3.10",
    packages=find_packages(include=["lfvila", "lfvila.*"]),  # the subpackages too (a plain ["lfvila"] omits them)
    install_requires=[
        "lfvila-kernels==0.1.0",  # kernels/: install it first (pip resolves it from there, not from an index)
        "torch>=2.5",
        "triton>=3.0",
        "einops>=0.7",
        "numpy>=1.24",
        "av>=18",
        "tokenizers>=0.15",
        "transformers>=4.40",
        "safetensors>=0.4",
        "pyyaml>=6",
        "tqdm>=4.60",
        "lmdb>=1.4",
        "webdataset>=0.2.86",
    ],
    extras_require={
        "test": ["pytest>=8", "pytest-randomly>=3.15", "pytest-xdist>=3.5", "ruff>=0.5", "nvidia-dali-cuda130>=2.0",
                 "matplotlib>=3.7", "tensorboard>=2.14"],
        "bench": ["matplotlib>=3.7"],
        "demo": ["matplotlib>=3.7", "tensorboard>=2.14"],
        "dali": ["nvidia-dali-cuda130>=2.0"],
        # The models and losses that lfvila_kernels.patch / lfvila_kernels.clip_loss drop into (bench_dropin, the
        # drop-in tests). Both require torchvision, and every torchvision release pins one torch version: install the
        # torchvision matching your torch first (torch 2.13.0: torchvision 0.28.0), or pip replaces torch. PyPI's
        # torchvision wheels are built against CUDA torch and do not load on a CPU build of torch; there the tests
        # use timm and open_clip_torch installed with --no-deps (see the Makefile).
        "dropin": ["timm>=1.0", "open_clip_torch>=2.24", "monai>=1.3"],
    },
)
