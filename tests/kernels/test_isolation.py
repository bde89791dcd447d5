"""One copy of the kernels per process, whatever else is imported.

The folder ``kernels/`` used to be the package itself, importable as ``kernels`` from the checkout root. Importing a
transformers model made transformers probe for Hugging Face's ``kernels`` distribution and import ours under that
name: a second copy whose ``torch.library`` registrations replaced the first's, so ``override_config`` of
``lfvila_kernels`` stopped reaching the contrastive op (issue 14: a fused-loss test failed after a drop-in test)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

PROBE = """
import sys
sys.path.insert(0, {root!r})  # as pytest's pythonpath and `python -m` from the checkout root do
import torch
import lfvila_kernels
from lfvila_kernels import _contrastive_triton as fused
from transformers import SwinForImageClassification  # the import that used to load the second copy
from transformers.utils import import_utils
copies = sorted(m for m in sys.modules if m.startswith("kernels."))
assert not copies, copies
assert not import_utils.is_kernels_available(), "our folder must not pass for Hugging Face's kernels package"

# the op still runs the module we configure: a forced tile size is seen by the launcher
seen = []
original = fused._config
fused._config = lambda n, m, d: seen.append(original(n, m, d)) or seen[-1]
a, b = torch.randn(20, 16), torch.randn(20, 16)
with fused.override_config(block_m=16, block_n=16, block_k=16, block_do=16, programs=2):
    lfvila_kernels.contrastive_loss(a, b, impl="triton")
assert seen and seen[0]["block_m"] == 16, seen
print("ok")
"""


def test_transformers_import_loads_no_second_copy():
    out = subprocess.run([sys.executable, "-c", PROBE.format(root=str(ROOT))], cwd=ROOT, capture_output=True,
                         text=True, timeout=300, env={**__import__("os").environ, "TRITON_INTERPRET": "1"})
    assert out.returncode == 0 and out.stdout.strip().endswith("ok"), out.stderr[-3000:]


def test_import_under_another_name_is_refused():
    sys.path.insert(0, str(ROOT))
    try:
        with pytest.raises(ImportError, match="import it as lfvila_kernels"):
            __import__("kernels.lfvila_kernels")
    finally:
        sys.path.remove(str(ROOT))
        for name in [m for m in sys.modules if m == "kernels" or m.startswith("kernels.")]:
            del sys.modules[name]
