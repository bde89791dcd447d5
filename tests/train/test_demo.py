"""`make demo`'s pipeline at reduced size (a few videos, two steps per stage) and `train.evaluate` on its output."""

from __future__ import annotations

import json
import os

from train import demo, evaluate

CONFIGS = os.path.join(os.path.dirname(__file__), "..", "..", "train", "configs")


def test_demo_pipeline_reduced(tmp_path):
    out, data = tmp_path / "demo", tmp_path / "data"
    result = demo.main(["--out", str(out), "--data", str(data), "--videos", "10", "--max-steps", "2",
                        "--batch-size", "2", "--workers", "1"])
    report = (out / "report.md").read_text()
    assert "| chance |" in report and "| zero-shot (stage 1) |" in report and "| fine-tuned |" in report
    for png in ("loss.png", "throughput.png"):
        assert (out / png).stat().st_size > 1000
    n = result["n_test"]
    assert result["finetuned"]["t2v_n"] == n and result["zero_shot"]["v2t_n"] == n
    assert json.loads((out / "demo.json").read_text())["n_test"] == n
    assert (out / "retrieval" / "best" / "model.safetensors").exists()

    # the evaluation entry point on the fine-tuned checkpoint reproduces the loop's test metrics
    args = ["--config", str(out / "retrieval" / "config.yaml"), "--checkpoint", str(out / "retrieval" / "best"),
            "--split", "test", "--out", str(tmp_path / "eval.json"), "--run.resume", "none",
            "--model.init", "[]"]
    metrics = evaluate.main(args)
    assert metrics["t2v_R@1"] == result["finetuned"]["t2v_R@1"]
    assert metrics["v2t_MdR"] == result["finetuned"]["v2t_MdR"]
    assert json.loads((tmp_path / "eval.json").read_text())["split"] == "test"
