"""Test-wide setup.

Without CUDA, the Triton kernels run through Triton's interpreter (``TRITON_INTERPRET=1``), so plain ``make test``
exercises the real kernels on the CPU. The switch must happen before ``triton`` is first imported: ``@triton.jit``
decides at decoration time whether a kernel is compiled or interpreted.

Order independence. ``make test`` runs the tests in a random order (pytest-randomly; the seed is printed in the header,
``--randomly-seed=N`` replays one, ``-p no:randomly`` gives file order). The autouse fixture below keeps any order
equivalent to any other:

- every test starts from the same global RNG states (torch, ``random``, numpy: ``TEST_SEED``, whatever the order's
  seed), so a test that draws from a global generator sees the same numbers whatever ran before it;
- it snapshots the process-wide settings a test or the code under test could change (the
  environment, torch's thread count, default dtype, matmul precision and determinism switches, grad mode, the kernels'
  config overrides, and a second copy of ``lfvila_kernels`` imported under another name) and fails the test that
  changed one, naming it, after putting it back. Such a change inside the library would leak into a user's program
  too, so the fix belongs at its source, not in the test order.
"""

import os
import random
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

if not torch.cuda.is_available():
    if "triton" in sys.modules and os.environ.get("TRITON_INTERPRET") != "1":
        raise RuntimeError("triton was imported before tests/conftest.py could switch on its interpreter")
    os.environ["TRITON_INTERPRET"] = "1"

# Under pytest-xdist (``make test`` runs ``-n 2``) each worker gets its share of the CPUs: two workers of two torch
# threads each on two cores would oversubscribe them (OpenMP threads spinning against each other). The environment
# variable carries the share to the processes the tests start (DDP ranks, DataLoader workers, subprocess runs).
_workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
if _workers > 1 and "OMP_NUM_THREADS" not in os.environ:
    _cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    _share = max(1, _cpus // _workers)
    os.environ["OMP_NUM_THREADS"] = str(_share)
    torch.set_num_threads(_share)

TEST_SEED = 1234
# Variables that torch's compiler sets for itself on first use (its default cache directory, its own bookkeeping):
# no change of behaviour for later tests, and nothing our code or our tests control.
IGNORED_ENV_PREFIXES = ("PYTEST_CURRENT_TEST", "TORCHINDUCTOR_", "_TORCHINDUCTOR_")


def _environ() -> dict:
    return {k: v for k, v in os.environ.items() if not k.startswith(IGNORED_ENV_PREFIXES)}


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


def _kernel_overrides():
    from lfvila_kernels import _contrastive_launch, _siglip_launch, _window_attention_launch

    return (_contrastive_launch._config_override, _siglip_launch._config_override,
            _window_attention_launch._config_override)


_KERNEL_SOURCE = str(Path(__file__).resolve().parents[1] / "kernels" / "lfvila_kernels") + os.sep


def _shadow_copies():
    """Modules executing our kernels' source under a name other than ``lfvila_kernels.*``: each would re-register the
    ``lfvila_kernels::*`` ops. (Once it was ``kernels.*`` from the checkout root, which transformers' probe for Hugging
    Face's ``kernels`` package imported. That package itself, a dependency of transformers >= 5.25, is no copy.)"""
    return sorted(name for name, module in list(sys.modules.items())
                  if not (name == "lfvila_kernels" or name.startswith("lfvila_kernels."))
                  and (getattr(module, "__file__", None) or "").startswith(_KERNEL_SOURCE))


# name -> (read, write or None): what a test must leave as it found it
_GLOBAL_STATE = {
    "os.environ": (_environ, None),
    "torch.get_num_threads()": (torch.get_num_threads, torch.set_num_threads),
    "torch.get_default_dtype()": (torch.get_default_dtype, torch.set_default_dtype),
    "torch.get_float32_matmul_precision()": (torch.get_float32_matmul_precision,
                                             torch.set_float32_matmul_precision),
    "torch.are_deterministic_algorithms_enabled()": (torch.are_deterministic_algorithms_enabled,
                                                     torch.use_deterministic_algorithms),
    "torch.backends.cuda.matmul.allow_tf32": (lambda: torch.backends.cuda.matmul.allow_tf32,
                                              lambda v: setattr(torch.backends.cuda.matmul, "allow_tf32", v)),
    "torch.backends.cudnn.allow_tf32": (lambda: torch.backends.cudnn.allow_tf32,
                                        lambda v: setattr(torch.backends.cudnn, "allow_tf32", v)),
    "torch.backends.cudnn.benchmark": (lambda: torch.backends.cudnn.benchmark,
                                       lambda v: setattr(torch.backends.cudnn, "benchmark", v)),
    "torch.is_grad_enabled()": (torch.is_grad_enabled, torch.set_grad_enabled),
    "lfvila_kernels config overrides": (_kernel_overrides, None),
    "second copy of lfvila_kernels in sys.modules": (_shadow_copies, None),
}


def _restore_environ(saved: dict) -> None:
    for key in set(_environ()) - set(saved):
        del os.environ[key]
    os.environ.update(saved)


@pytest.fixture(autouse=True)
def _no_global_state_leaks():
    torch.manual_seed(TEST_SEED)
    random.seed(TEST_SEED)  # after pytest-randomly's own reseeding: the order's seed changes the order only
    np.random.seed(TEST_SEED)
    before = {name: read() for name, (read, _) in _GLOBAL_STATE.items()}
    yield
    changed = []
    for name, (read, write) in _GLOBAL_STATE.items():
        now = read()
        if now == before[name]:
            continue
        if name == "os.environ":
            diff = sorted(k for k in set(now) | set(before[name]) if now.get(k) != before[name].get(k))
            changed.append(f"{name} (keys {diff})")
            _restore_environ(before[name])
        else:
            changed.append(f"{name}: {before[name]!r} -> {now!r}")
            if write is not None:
                write(before[name])
    if changed:
        pytest.fail("the test left process-wide state changed (it would leak into every later test, and the same "
                    "change inside the library into a user's program): " + "; ".join(changed), pytrace=False)
