"""One copy of the kernels per process, whatever else is imported.

The folder ``kernels/`` used to be the package itself, importable as ``kernels`` from the checkout root. Importing a
transformers model made transformers probe for Hugging Face's ``kernels`` distribution and import ours under that
name: a second copy whose ``torch.library`` registrations replaced the first's, so ``override_config`` of
``lfvila_kernels`` stopped reaching the contrastive op (issue 14: a fused-loss test failed after a drop-in test).

Since transformers 5.25 the real ``kernels`` distribution is one of its dependencies, so these tests hold with and
without it: a copy is any module that runs our source under a name other than ``lfvila_kernels.*``."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

PROBE = """
import importlib.util
import os
import sys
sys.path.insert(0, {root!r})  # as pytest's pythonpath and `python -m` from the checkout root do
import torch
import lfvila_kernels
from lfvila_kernels import _contrastive_launch as fused
from transformers import SwinForImageClassification  # the import that used to load the second copy
from transformers.utils import import_utils
source = os.path.join({root!r}, "kernels", "lfvila_kernels") + os.sep
copies = sorted(n for n, m in list(sys.modules.items()) if not n.startswith("lfvila_kernels")
                and (getattr(m, "__file__", None) or "").startswith(source))
assert not copies, copies
# our folder must not pass for Hugging Face's kernels package: either that package is installed and `kernels` is it,
# or `kernels` is not available
spec = importlib.util.find_spec("kernels")
if import_utils.is_kernels_available():
    assert spec.origin and not spec.origin.startswith(os.path.join({root!r}, "kernels") + os.sep), spec
else:
    assert spec is None or spec.origin in (None, "namespace"), spec

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
    """Our package's source loaded under any other name (``kernels.lfvila_kernels`` from the checkout root was the
    one seen) refuses to run, before it registers an op."""
    name = "shadow_of_lfvila_kernels"
    package = ROOT / "kernels" / "lfvila_kernels"
    spec = importlib.util.spec_from_file_location(name, package / "__init__.py",
                                                  submodule_search_locations=[str(package)])
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        with pytest.raises(ImportError, match="import it as lfvila_kernels"):
            spec.loader.exec_module(module)
    finally:
        for key in [m for m in sys.modules if m == name or m.startswith(name + ".")]:
            del sys.modules[key]
