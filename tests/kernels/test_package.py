"""``lfvila-kernels`` is a distribution of its own (``kernels/pyproject.toml``) that needs torch and triton only.

The test builds its wheel from the checkout, installs it with ``--no-deps --no-index`` into a fresh venv that holds
nothing but torch, triton and their own requirements (linked in from this environment through a ``.pth`` file: the
test needs no network), and runs the kernels there on the CPU. Every module then loaded must come from the standard
library, from that closure of torch and triton, or from ``lfvila_kernels`` itself: none of av, transformers,
tokenizers, numpy, timm, open_clip or lfvila.
"""

from __future__ import annotations

import importlib.metadata as md
import json
import re
import subprocess
import sys
import venv
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

PROBE = r"""
import json, sys
import torch
import lfvila_kernels
from lfvila_kernels import clip_loss, patch  # the drop-ins too (they import no model library themselves)

q, k, v = (torch.randn(1, 2, 3, 5, 2, 8) for _ in range(3))
table = torch.randn(3 * 5 * 9, 2)
out = lfvila_kernels.window_attention(q, k, v, (2, 3, 5), (0, 1, 2), table)
ref = lfvila_kernels.window_attention_reference(q, k, v, (2, 3, 5), (0, 1, 2), table)
assert torch.allclose(out, ref, atol=1e-5), (out - ref).abs().max()
a, b = torch.randn(6, 4, requires_grad=True), torch.randn(6, 4, requires_grad=True)
lfvila_kernels.contrastive_loss(a, b).backward()
assert a.grad is not None
print(json.dumps({"file": lfvila_kernels.__file__, "modules": sorted({m.split(".")[0] for m in sys.modules})}))
"""


def _requirement_names(dist: md.Distribution) -> list[str]:
    """Names of ``dist``'s unconditional requirements (extras and environment markers that do not hold skipped)."""
    from packaging.requirements import Requirement  # pip and setuptools vendor it; torch's environment has it

    names = []
    for text in dist.requires or []:
        req = Requirement(text)
        if req.marker is None or req.marker.evaluate({"extra": ""}):
            names.append(req.name)
    return names


def _closure(roots: list[str]) -> dict[str, md.Distribution]:
    """The installed distributions ``roots`` need, with their requirements, recursively (normalised name -> dist)."""
    seen: dict[str, md.Distribution] = {}
    todo = list(roots)
    while todo:
        name = re.sub(r"[-_.]+", "-", todo.pop()).lower()
        if name in seen:
            continue
        try:
            seen[name] = md.distribution(name)
        except md.PackageNotFoundError:  # an optional requirement this environment lacks: the venv lacks it too
            continue
        todo += _requirement_names(seen[name])
    return seen


def _link_closure(dists: dict[str, md.Distribution], into: Path) -> set[str]:
    """Symlink every top-level entry (packages, modules, ``.libs``, ``.dist-info``) of ``dists`` into ``into``;
    returns the importable top-level names."""
    into.mkdir()
    names = set()
    for dist in dists.values():
        site = Path(dist.locate_file(""))
        for top in {f.parts[0] for f in dist.files or [] if not f.parts[0].startswith("..")}:
            if not (into / top).exists() and (site / top).exists():
                (into / top).symlink_to(site / top)
            names.add(top.split(".")[0] if top.endswith((".py", ".so")) else top)
    return names


def test_kernels_wheel_installs_and_runs_with_torch_and_triton_only(tmp_path):
    wheels = tmp_path / "wheels"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-q",
                    "-w", str(wheels), str(ROOT / "kernels")], check=True, capture_output=True, timeout=300)
    (wheel,) = wheels.glob("lfvila_kernels-*.whl")

    env_dir = tmp_path / "venv"
    venv.EnvBuilder(with_pip=False).create(env_dir)
    py = env_dir / "bin" / "python"
    site = Path(subprocess.run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                               check=True, capture_output=True, text=True).stdout.strip())
    dists = _closure(["torch", "triton"])
    assert {"torch", "triton"} <= set(dists), sorted(dists)
    assert not {"av", "transformers", "tokenizers", "numpy", "lfvila"} & set(dists), sorted(dists)
    provided = _link_closure(dists, tmp_path / "deps")
    (site / "torch_and_triton.pth").write_text(str(tmp_path / "deps") + "\n")
    subprocess.run([sys.executable, "-m", "pip", "--python", str(py), "install", "--no-deps", "--no-index", "-q",
                    str(wheel)], check=True, capture_output=True, timeout=300)

    out = subprocess.run([str(py), "-c", PROBE], cwd=tmp_path, capture_output=True, text=True, timeout=300,
                         env={"PATH": "/usr/bin:/bin", "HOME": str(tmp_path)})
    assert out.returncode == 0, out.stderr[-3000:]
    report = json.loads(out.stdout.strip().splitlines()[-1])
    assert Path(report["file"]).is_relative_to(site), report["file"]  # the installed wheel, not the checkout
    interpreter = {"__main__", "__mp_main__", "lfvila_kernels"}  # the script, multiprocessing's alias of it, ours
    foreign = [m for m in report["modules"] if m not in sys.stdlib_module_names and m not in provided
               and m not in interpreter and not m.startswith("_sysconfigdata")]
    assert not foreign, foreign
    assert not {"av", "transformers", "tokenizers", "lfvila", "timm", "open_clip", "monai"} & set(report["modules"])
