"""Plots and markdown tables from results CSVs: one PNG and one table section per suite and shape set.

Command (from the repository root)::

    python -m benchmarks.plot benchmarks/results/attention-cpu.csv [more.csv ...] [--label cpu-reduced]
        [--out-dir benchmarks/results/plots] [--markdown benchmarks/results/attention-cpu.md]

Rows are grouped by (label, kernel, x axis): for window attention the x axis names the shape set (``layer``:
``lfvila``, ``stage``: ``video-swin-k400``, ``frames``: ``long-form``, ``window_tokens``: ``window-sweep``). Each
group gives ``<out-dir>/<suite>-<set>-<label>.png``: one column per mode, one row per plotted metric (time, or clips/s,
and peak memory where measured), one line per provider; a log scale where values span more than a decade. Providers
that failed or were skipped have no line; the markdown lists them with the reason. The markdown has, per group and
mode, a provider x size table of medians with the speed-up over the suite's baseline provider.
"""

from __future__ import annotations

import argparse
import re
from collections.abc import Sequence
from pathlib import Path

SUITES = {"window_attention": "attention", "contrastive_loss": "contrastive", "sigmoid_loss": "siglip",
          "decode": "decode", "train_step": "train", "swin-timm": "dropin", "swin-hf": "dropin",
          "clip-loss": "dropin"}  # fmt: skip
SHAPE_SET_OF_X = {"layer": "lfvila", "stage": "video-swin-k400", "frames": "long-form", "window_tokens": "window-sweep"}
BASELINES = {"window_attention": "videoswin-eager", "contrastive_loss": "naive", "sigmoid_loss": "open_clip",
             "decode": "pyav-1proc",
             "train_step": "torch", "swin-timm": "unpatched", "swin-hf": "unpatched",
             "clip-loss": "open_clip"}  # fmt: skip
# (metric, axis title, higher is better) in the order plotted; the first present is the table's headline metric.
PLOTTED = (
    ("time", "median time (ms)", False),
    ("clips_per_s", "clips/s", True),
    ("memory", "peak memory (MB)", False),
    ("peak_rss", "peak RSS increase (MB)", False),
)


def group_rows(rows: Sequence[dict]) -> dict[tuple[str, str, str], list[dict]]:
    """Rows by (label, kernel, x_name), in order of first appearance."""
    groups: dict[tuple[str, str, str], list[dict]] = {}
    for r in rows:
        groups.setdefault((r["label"], r["kernel"], r["x_name"]), []).append(r)
    return groups


def group_name(kernel: str, x_name: str) -> str:
    """``<suite>-<shape set>``, e.g. ``attention-long-form``, ``contrastive-N``, ``dropin-swin-timm``."""
    suite = SUITES.get(kernel, kernel)
    if suite == "attention":
        return f"{suite}-{SHAPE_SET_OF_X.get(x_name, x_name)}"
    return f"{suite}-{kernel if suite == 'dropin' else x_name}"


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.+-]+", "-", text).strip("-") or "run"


def _x_order(rows: Sequence[dict]) -> list[str]:
    xs = list(dict.fromkeys(r["x_value"] for r in rows))
    try:
        return sorted(xs, key=float)
    except ValueError:
        return xs


def _numeric(xs: Sequence[str]) -> bool:
    try:
        [float(x) for x in xs]
    except ValueError:
        return False
    return True


def plot_group(rows: Sequence[dict], path: str | Path, title: str) -> Path | None:
    """One PNG for one group; None when nothing in it can be drawn (no ok rows of a plotted metric)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metrics = [(m, t) for m, t, _ in PLOTTED if any(r["metric"] == m and r["status"] == "ok" for r in rows)]
    if not metrics:
        return None
    modes = list(dict.fromkeys(r["mode"] for r in rows))
    xs = _x_order(rows)
    numeric = _numeric(xs)
    providers = list(dict.fromkeys(r["provider"] for r in rows))
    colors = {p: f"C{i % 10}" for i, p in enumerate(providers)}
    fig, axes = plt.subplots(len(metrics), len(modes), figsize=(4.2 * len(modes), 3.2 * len(metrics)), squeeze=False)
    for i, (metric, axis_title) in enumerate(metrics):
        for j, mode in enumerate(modes):
            ax = axes[i][j]
            values = []
            for p in providers:
                cell = {r["x_value"]: r for r in rows if r["provider"] == p and r["mode"] == mode
                        and r["metric"] == metric and r["status"] == "ok"}  # fmt: skip
                pts = [(x, float(cell[x]["p50"])) for x in xs if x in cell]
                if not pts:
                    continue
                px = [float(x) if numeric else xs.index(x) for x, _ in pts]
                py = [y for _, y in pts]
                lo = [float(cell[x]["p20"]) for x, _ in pts]
                hi = [float(cell[x]["p80"]) for x, _ in pts]
                ax.plot(px, py, marker="o", color=colors[p], label=p)
                ax.fill_between(px, lo, hi, color=colors[p], alpha=0.15, linewidth=0)
                values += py
            if not values:
                ax.text(0.5, 0.5, f"{metric}: not measured\n(see the table)", ha="center", va="center",
                        transform=ax.transAxes, color="gray")  # fmt: skip
            elif min(values) > 0 and max(values) / min(values) > 10:
                ax.set_yscale("log")
            if numeric:
                ax.set_xscale("log", base=2)
                ax.set_xticks([float(x) for x in xs], xs)
                ax.minorticks_off()
            else:
                ax.set_xticks(range(len(xs)), xs, rotation=30 if len(xs) > 4 else 0)
            ax.set_title(f"{mode}" if i == 0 else "", fontsize=10)
            ax.set_xlabel(rows[0]["x_name"])
            ax.set_ylabel(axis_title if j == 0 else "")
            ax.grid(alpha=0.3)
    handles, labels = [], []
    for ax in axes.flat:
        for h, lab in zip(*ax.get_legend_handles_labels(), strict=True):
            if lab not in labels:
                handles.append(h)
                labels.append(lab)
    fig.legend(handles, labels, loc="lower center", ncol=min(len(labels), 5), fontsize=8, frameon=False)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout(rect=(0, 0.05 + 0.03 * ((len(labels) - 1) // 5), 1, 0.95))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def cell_text(row: dict | None, base: dict | None, relation: str | None, digits: int = 3) -> str:
    """One table cell: "" without a row, the status of a row that is not ok, else the median with, when ``base`` is an
    ok row, the ratio in parentheses (``relation`` as in :func:`markdown_table`)."""
    if row is None:
        return ""
    if row["status"] != "ok":
        return row["status"]
    v, extra = float(row["p50"]), ""
    if relation and base is not None and base["status"] == "ok" and v > 0 and float(base["p50"]) > 0:
        b = float(base["p50"])
        extra = f" ({(b / v if relation == 'baseline/value' else v / b):.3g}x)"
    return f"{v:.{digits}g}{extra}"


def markdown_table(
    rows: Sequence[dict],
    metric: str,
    mode: str,
    baseline: str | None,
    relation: str | None = "baseline/value",
    title: str | None = None,
) -> str:
    """Provider x size table of one metric and mode: medians, and in parentheses the ratio to ``baseline`` where both
    ran: ``relation`` ``"baseline/value"`` (a speed-up, for lower-is-better metrics), ``"value/baseline"`` (a
    fraction of the baseline's memory, or a speed-up of a throughput) or None. "" when there is no such row."""
    if relation not in ("baseline/value", "value/baseline", None):
        raise ValueError(f"relation must be 'baseline/value', 'value/baseline' or None, got {relation!r}")
    sel = [r for r in rows if r["metric"] == metric and r["mode"] == mode]
    if not sel:
        return ""
    xs = _x_order(sel)
    providers = list(dict.fromkeys(r["provider"] for r in sel))
    cell = {(r["provider"], r["x_value"]): r for r in sel}
    with_ratio = relation is not None and baseline in providers
    if title is None:
        title = f"{mode}: {metric} ({sel[0]['unit']}), median" + (f"; ({relation} vs {baseline})" if with_ratio else "")
    lines = [f"**{title}**", "", f"| provider \\ {sel[0]['x_name']} | " + " | ".join(xs) + " |",
             "|---|" + "---|" * len(xs)]  # fmt: skip
    for p in providers:
        cells = [cell_text(cell.get((p, x)), cell.get((baseline, x)) if with_ratio else None, relation) for x in xs]
        lines.append(f"| {p} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def markdown_report(rows: Sequence[dict], images: dict | None = None) -> str:
    """Every group's tables (headline metric per mode, peak memory where measured), its plot and the reasons of
    failed or skipped providers."""
    images = images or {}
    parts = []
    for (label, kernel, x_name), group in group_rows(rows).items():
        first = group[0]
        name = group_name(kernel, x_name)
        parts.append(f"### {name} (`{label}`)\n\n{first['device']}; torch {first['torch']}, triton {first['triton']}, "
                     f"Python {first['python']}; commit `{first['commit']}`; {first['timestamp'][:10]}; "
                     f"{first['dtype']}")  # fmt: skip
        image = images.get((label, kernel, x_name))
        if image:
            parts.append(f"![{name}]({image})")
        for metric, _, higher in PLOTTED:
            if not any(r["metric"] == metric and r["status"] == "ok" for r in group):
                continue
            for mode in dict.fromkeys(r["mode"] for r in group):
                relation = "value/baseline" if higher else "baseline/value"
                table = markdown_table(group, metric, mode, BASELINES.get(kernel), relation)
                if table:
                    parts.append(table)
        reasons: dict[tuple[str, str, str], dict] = {}
        for r in group:
            if r["status"] != "ok" and r["metric"] in ("time", "clips_per_s"):
                reasons.setdefault((r["provider"], r["status"], r["note"]), {})[r["x_value"]] = None
        if reasons:
            parts.append("\n".join(f"- `{p}` {s} ({', '.join(xs)}): {n}" for (p, s, n), xs in reasons.items()))
    return "\n\n".join(parts)


def plot_all(rows: Sequence[dict], out_dir: str | Path, relative_to: str | Path | None = None) -> dict:
    """A PNG per group in ``out_dir``; returns {(label, kernel, x_name): path} (relative to ``relative_to``)."""
    images = {}
    for (label, kernel, x_name), group in group_rows(rows).items():
        name = group_name(kernel, x_name)
        path = Path(out_dir) / f"{_slug(name)}-{_slug(label)}.png"
        title = f"{name} | {label} | {group[0]['device']} | {group[0]['dtype']} | {group[0]['timestamp'][:10]}"
        done = plot_group(group, path, title)
        if done is not None:
            images[(label, kernel, x_name)] = (
                done.resolve().relative_to(Path(relative_to).resolve()) if relative_to else done
            ).as_posix()
    return images


def main(argv: Sequence[str] | None = None) -> str:
    from benchmarks.compare import read_csvs

    p = argparse.ArgumentParser(prog="python -m benchmarks.plot", description=__doc__.split("\n")[0])
    p.add_argument("csv", nargs="+", help="results CSVs (globs allowed)")
    p.add_argument("--label", default=None, help="only the rows of this label (default: every label)")
    p.add_argument("--out-dir", default="benchmarks/results/plots", help="where the PNGs go")
    p.add_argument("--markdown", default=None, help="also write the tables to this file (image links relative to it)")
    args = p.parse_args(argv)
    rows = read_csvs(args.csv)
    if args.label is not None:
        rows = [r for r in rows if r["label"] == args.label]
    if not rows:
        p.error(f"no rows in {args.csv}" + (f" with label {args.label!r}" if args.label else ""))
    relative = Path(args.markdown).parent if args.markdown else None
    images = plot_all(rows, args.out_dir, relative)
    text = markdown_report(rows, images)
    if args.markdown:
        Path(args.markdown).write_text(text + "\n")
    print(text)
    for path in images.values():
        print(f"# wrote {path}")
    return text


if __name__ == "__main__":
    main()
