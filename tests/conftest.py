"""Test-wide setup.

Without CUDA, the Triton kernels run through Triton's interpreter (``TRITON_INTERPRET=1``), so plain ``make test``
exercises the real kernels on the CPU. The switch must happen before ``triton`` is first imported: ``@triton.jit``
decides at decoration time whether a kernel is compiled or interpreted.
"""

import os
import sys

import pytest
import torch

if not torch.cuda.is_available():
    if "triton" in sys.modules and os.environ.get("TRITON_INTERPRET") != "1":
        raise RuntimeError("triton was imported before tests/conftest.py could switch on its interpreter")
    os.environ["TRITON_INTERPRET"] = "1"


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)
