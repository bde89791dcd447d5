"""The project's main job on the embedded default (``make demo``): offline, end to end, on a CPU in minutes.

    python -m train.demo [--out runs/demo] [--data data/synthetic] [--videos 640] [--stage1-epochs N]
                         [--retrieval-epochs N] [--batch-size 16] [--workers 2]

1. generates the synthetic long-form dataset (``lfvila.data.synthetic``: real H.264 / VP9 videos of scripted events,
   paragraphs with time stamps, families of videos sharing events in different orders) unless it is there already;
2. pre-trains ``lfvila-tiny`` stage 1 (VPC + MTC) on its train split (``train/configs/demo_stage1.yaml``);
3. evaluates it zero-shot on the test split (paragraph-to-video and video-to-paragraph retrieval), with the stage-1
   checkpoint that was best on the val split and the retrieval protocol (frames uniform over the whole video; stage 1
   itself samples clip i inside sentence i's span, which needs the test annotations' time stamps);
4. fine-tunes ``lfvila-tiny-retrieval`` from the stage-1 weights (``demo_retrieval.yaml``), selecting the best
   checkpoint on the val split, and evaluates it on the test split;
5. writes ``OUT/report.md``: the retrieval table (zero-shot and fine-tuned against chance), the training curves
   (``loss.png``) and the throughput (``throughput.png``).

On a GPU the same command runs there (``run.device: auto``); the figures in the README come from the CPU run.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from lfvila.config import load_config

ROOT = Path(__file__).resolve().parent


def _read_metrics(path: Path) -> list[dict]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _plots(out: Path, runs: dict[str, Path]) -> list[str]:
    """loss.png and throughput.png from the runs' metrics.jsonl; returns the files written."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    fig, axes = plt.subplots(1, len(runs), figsize=(5.5 * len(runs), 3.8), squeeze=False)
    for ax, (name, run) in zip(axes[0], runs.items()):
        rows = [r for r in _read_metrics(run / "metrics.jsonl") if "loss" in r]
        for key in ("loss", "vpc", "mtc"):
            pts = [(r["step"], r[key]) for r in rows if key in r]
            if pts:
                ax.plot(*zip(*pts), label=key)
        ax.set_title(f"{name}: training loss")
        ax.set_xlabel("step")
        ax.legend()
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out / "loss.png", dpi=110)
    plt.close(fig)
    written.append("loss.png")
    fig, ax = plt.subplots(figsize=(6, 3.8))
    for name, run in runs.items():
        pts = [(r["step"], r["clips_per_s"]) for r in _read_metrics(run / "metrics.jsonl") if "clips_per_s" in r]
        if pts:
            ax.plot(*zip(*pts), label=f"{name} clips/s")
    ax.set_xlabel("step")
    ax.set_ylabel("clips / s")
    ax.set_title("training throughput")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out / "throughput.png", dpi=110)
    plt.close(fig)
    written.append("throughput.png")
    return written


def _table(results: dict[str, dict], n_test: int) -> str:
    chance = {"R@1": 100.0 / n_test, "R@5": min(100.0, 500.0 / n_test), "R@10": min(100.0, 1000.0 / n_test),
              "MdR": (n_test + 1) / 2}
    cols = ["t2v_R@1", "t2v_R@5", "t2v_R@10", "t2v_MdR", "v2t_R@1", "v2t_R@5", "v2t_MdR"]
    lines = ["| model | " + " | ".join(c.replace("_", " ") for c in cols) + " |",
             "|---|" + "---:|" * len(cols)]
    lines.append("| chance | " + " | ".join(f"{chance[c.split('_')[1]]:.1f}" for c in cols) + " |")
    for name, m in results.items():
        lines.append(f"| {name} | " + " | ".join(f"{m[c]:.1f}" for c in cols) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m train.demo", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="runs/demo")
    parser.add_argument("--data", default="data/synthetic")
    parser.add_argument("--videos", type=int, default=640)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--stage1-epochs", type=int, default=None)
    parser.add_argument("--retrieval-epochs", type=int, default=None)
    parser.add_argument("--batch-size", type=int, default=None)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--max-steps", type=int, default=None, help="cap each training stage (tests)")
    args = parser.parse_args(argv)

    from lfvila.data.synthetic import make_dataset
    from lfvila.models.factory import build_model

    from . import evaluate
    from .loop import Trainer

    began = time.time()
    out, data = Path(args.out), Path(args.data)
    out.mkdir(parents=True, exist_ok=True)
    summary = make_dataset(data, videos=args.videos, seed=args.seed, min_seconds=20.0, max_seconds=45.0,
                           workers=args.workers)
    print(f"[demo] dataset: {json.dumps(summary)}", flush=True)
    common = ["--data.video_root", str(data), "--data.train", str(data / "train.json"),
              "--data.val", str(data / "val.json"), "--data.test", str(data / "test.json"),
              "--data.vocab", str(data / "vocab.txt"), "--data.num_workers", str(args.workers),
              "--run.resume", "none"]
    if args.batch_size:
        common += ["--train.batch_size", str(args.batch_size)]
    if args.max_steps:
        common += ["--train.max_steps", str(args.max_steps)]
    vocab = ["--model.overrides.text.vocab_size", str(summary["vocab_size"])]

    s1 = common + vocab + ["--run.dir", str(out / "stage1")]
    if args.stage1_epochs:
        s1 += ["--train.epochs", str(args.stage1_epochs)]
    cfg1 = load_config(ROOT / "configs" / "demo_stage1.yaml", s1)
    stage1 = Trainer(cfg1).fit()
    # zero-shot: the best-on-val stage-1 weights under the retrieval protocol (uniform frames, no time stamps)
    zero_shot = evaluate.main(["--config", str(ROOT / "configs" / "demo_stage1.yaml"), *s1,
                               "--data.sampling", "uniform", "--checkpoint", str(out / "stage1" / "best"),
                               "--split", "test", "--out", str(out / "zero_shot.json")])

    init = out / "stage1" / "best" / "model.safetensors"
    ret = common + vocab + ["--run.dir", str(out / "retrieval"),
                            "--model.init", f"[{{kind: pretraining, path: {init}}}]"]
    if args.retrieval_epochs:
        ret += ["--train.epochs", str(args.retrieval_epochs)]
    cfg2 = load_config(ROOT / "configs" / "demo_retrieval.yaml", ret)
    build_model(cfg2.model)  # fail early on a bad init path
    finetuned = Trainer(cfg2).fit()

    n_test = summary["splits"]["test"]
    results = {"zero-shot (stage 1)": zero_shot, "fine-tuned": finetuned["test"]}
    plots = _plots(out, {"stage 1": out / "stage1", "retrieval": out / "retrieval"})
    seconds = time.time() - began
    rows1 = [r for r in _read_metrics(out / "stage1" / "metrics.jsonl") if "clips_per_s" in r]
    rows2 = [r for r in _read_metrics(out / "retrieval" / "metrics.jsonl") if "clips_per_s" in r]
    speed = {name: sum(r["clips_per_s"] for r in rows) / len(rows) for name, rows in
             (("stage 1", rows1), ("retrieval", rows2)) if rows}
    report = [
        "# lfvila demo: synthetic long-form retrieval",
        "",
        f"Dataset: {summary['videos']} synthetic videos ({summary['splits']}), codecs {summary['codecs']}, "
        f"vocabulary {summary['vocab_size']} tokens. Model: lfvila-tiny ({cfg1.data.clips} clips x "
        f"{cfg1.data.frames_per_clip} frames at {cfg1.data.size[0]}x{cfg1.data.size[1]}).",
        f"Stage 1: {stage1['step']} steps; retrieval fine-tuning: {finetuned['step']} steps (best on val at step "
        f"{finetuned['best_step']}). Total wall time {seconds / 60:.1f} min.",
        "",
        f"## Paragraph-to-video (t2v) and video-to-paragraph (v2t) retrieval on the test split ({n_test} videos)",
        "",
        _table(results, n_test),
        "",
        "R@K in percent (higher is better), MdR the median rank (lower is better); chance is a random ranking.",
        "",
        "## Training",
        "",
        "![loss](loss.png)",
        "",
        "![throughput](throughput.png)",
        "",
        "Mean throughput: " + ", ".join(f"{k} {v:.1f} clips/s" for k, v in speed.items()) + ".",
        "",
    ]
    (out / "report.md").write_text("\n".join(report))
    result = {"zero_shot": zero_shot, "finetuned": finetuned["test"], "n_test": n_test, "seconds": seconds,
              "plots": plots}
    (out / "demo.json").write_text(json.dumps(result, indent=2))
    print(f"[demo] report: {out / 'report.md'} ({seconds / 60:.1f} min)", flush=True)
    return result


if __name__ == "__main__":
    main()
