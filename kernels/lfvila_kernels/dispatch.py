"""Picks the implementation of an op per call: ``triton`` (fused kernels) or ``torch`` (``reference.py``).

``impl="auto"`` takes Triton for CUDA tensors and the torch reference elsewhere; the environment variable
``LFVILA_KERNELS=triton|torch`` overrides ``auto``. Asking for Triton where it cannot run raises an error that says
why (the tensors are on the CPU and Triton's interpreter is off, triton is missing, the dtype is unsupported, ...).
Under ``TRITON_INTERPRET=1`` the Triton kernels run on CPU tensors through Triton's interpreter (used by the tests).
"""

from __future__ import annotations

import os

import torch

IMPLS = ("auto", "triton", "torch")
ENV_VAR = "LFVILA_KERNELS"


def _probe_triton() -> str | None:
    try:
        import triton  # noqa: F401
    except Exception as exc:  # ImportError, or a broken install raising anything else
        return f"triton cannot be imported ({type(exc).__name__}: {exc})"
    return None


# Probed once at import (a plain constant, so torch.compile traces the dispatch without graph breaks).
_TRITON_ERROR = _probe_triton()


def triton_import_error() -> str | None:
    """None when triton imports, else the reason it does not."""
    return _TRITON_ERROR


def interpreting() -> bool:
    """True when Triton's interpreter is on (``TRITON_INTERPRET=1``): kernels then run on CPU tensors."""
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


def triton_refusal(device: torch.device, dtype: torch.dtype, dtypes: tuple[torch.dtype, ...]) -> str | None:
    """Why the Triton path cannot take tensors of this device and dtype, or None if it can."""
    reason = triton_import_error()
    if reason:
        return reason
    if device.type != "cuda" and not (device.type == "cpu" and interpreting()):
        return f"tensors are on {device.type}; Triton kernels need CUDA tensors (or TRITON_INTERPRET=1 on the CPU)"
    if dtype not in dtypes:
        names = ", ".join(str(d).replace("torch.", "") for d in dtypes)
        return f"dtype {str(dtype).replace('torch.', '')} is not supported by the Triton kernel ({names})"
    return None


def select_impl(impl: str, device: torch.device, dtype: torch.dtype, dtypes: tuple[torch.dtype, ...]) -> str:
    """Resolve ``impl`` to ``"triton"`` or ``"torch"`` for tensors on ``device`` of ``dtype``.

    Raises ValueError for an unknown ``impl`` (or ``LFVILA_KERNELS`` value) and RuntimeError, with the reason, when
    Triton is forced where it cannot run.
    """
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    if impl == "auto":
        forced = os.environ.get(ENV_VAR, "").strip().lower()
        if forced and forced not in ("triton", "torch"):
            raise ValueError(f"{ENV_VAR} must be 'triton' or 'torch', got {forced!r}")
        if forced:
            impl = forced
        else:
            ok = device.type == "cuda" and triton_refusal(device, dtype, dtypes) is None
            return "triton" if ok else "torch"
    if impl == "triton":
        reason = triton_refusal(device, dtype, dtypes)
        if reason:
            raise RuntimeError(f"impl='triton' cannot run here: {reason}")
    return impl
