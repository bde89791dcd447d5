"""``python -m train.evaluate --save-features DIR`` (``train.features``): the exported video and paragraph features
are the retrieval evaluation's, in annotation order, with an index file naming each row; 2 gloo ranks gather their
parts in annotation order; tasks without retrieval features are refused."""

from __future__ import annotations

import datetime
import json
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from train.features import FEATURES_FILE, INDEX_FILE, gather_features, load_features, save_features

# The 2-rank test's processes import this module: the model library is imported inside the tests that need it.
CONFIGS = os.path.join(os.path.dirname(__file__), "..", "..", "train", "configs")


def test_export_equals_the_retrieval_evaluation(tmp_path):
    from lfvila.config import load_config
    from lfvila.data.synthetic import make_dataset
    from lfvila.models import convert
    from lfvila.models.factory import build_model
    from train import data as tdata
    from train import evaluate

    root = tmp_path / "syn"
    summary = make_dataset(root, videos=6, seed=5, min_seconds=8.0, max_seconds=12.0)
    n = summary["splits"]["train"]
    args = ["--config", os.path.join(CONFIGS, "demo_retrieval.yaml"), "--data.video_root", str(root),
            "--data.train", str(root / "train.json"), "--data.vocab", str(root / "vocab.txt"),
            "--data.num_workers", "0", "--eval.batch_size", "3", "--run.resume", "none", "--model.attn_impl", "torch",
            "--model.overrides",
            json.dumps({"text": {"vocab_size": summary["vocab_size"]}, "video": {"drop_path_rate": 0.0}})]
    cfg = load_config(args[1], args[2:])
    torch.manual_seed(0)
    model = build_model(cfg.model)
    convert.save_pretrained(model, tmp_path / "ckpt")
    common = args + ["--checkpoint", str(tmp_path / "ckpt"), "--split", "train"]  # 4 rows: batches of 3 and 1

    out = tmp_path / "feats"
    exported = evaluate.main(common + ["--save-features", str(out)])
    assert exported == evaluate.main(common)  # the metrics from the exported tensors are the evaluation's
    assert exported["t2v_n"] == n

    tensors, rows, meta = load_features(out)
    assert sorted(os.listdir(out)) == [FEATURES_FILE, INDEX_FILE]  # no temporary file left
    d = model.cfg.embed_dim
    assert tensors["video"].shape == tensors["paragraph"].shape == (n, d)
    assert tensors["video"].dtype == torch.float32 and tensors["index"].tolist() == list(range(n))
    torch.testing.assert_close(tensors["video"].norm(dim=1), torch.ones(n))
    assert meta["task"] == "retrieval" and meta["split"] == "train" and meta["rows"] == str(n)
    ann = tdata.annotations(cfg, "train")
    assert rows == [{"row": i, "index": i, "video_id": ann[i]["video_id"], "source": ann[i]["source"]}
                    for i in range(n)]

    # a row is its annotation row's embedding: the last row (the second export batch), alone through the model
    model.eval()
    cfg.eval.batch_size = 1
    with torch.no_grad():
        for batch in tdata.eval_loader(cfg, tdata.tokenizer(cfg), "train", 0, 1):
            if int(batch["index"][0]) != n - 1:
                continue
            torch.testing.assert_close(model.encode_video(batch["video"])["global"][0], tensors["video"][n - 1],
                                       rtol=1e-4, atol=1e-5)
            para = model.encode_text(batch["text_ids"], batch["text_mask"], batch["sentence_real"])["paragraph"]
            torch.testing.assert_close(para[0], tensors["paragraph"][n - 1], rtol=1e-4, atol=1e-5)

    # an index file that is not the features' own is refused
    (out / INDEX_FILE).write_text(json.dumps(rows[0]) + "\n")
    with pytest.raises(ValueError, match="not the index written with"):
        load_features(out)


def test_tasks_without_retrieval_features_are_refused(tmp_path):
    from train import evaluate

    with pytest.raises(ValueError, match="train.task 'video_classification'.*no retrieval features"):
        evaluate.main(["--config", os.path.join(CONFIGS, "coin_cls.yaml"), "--checkpoint", str(tmp_path),
                       "--save-features", str(tmp_path / "out")])
    assert not (tmp_path / "out").exists()


def test_save_refuses_mismatched_rows(tmp_path):
    feats = {"video": torch.zeros(3, 4), "paragraph": torch.zeros(2, 4)}
    with pytest.raises(ValueError, match="3 rows each"):
        save_features(tmp_path, feats, torch.arange(3), [{}] * 3)


def _gather_worker(rank, init_file, out_dir):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2,
                            timeout=datetime.timedelta(seconds=60))
    try:
        index = torch.tensor([[3, 0], [1, 4, 2]][rank])  # disjoint parts of 5 rows, unequal counts, any order
        local = {"video": index[:, None].float().repeat(1, 2), "paragraph": -index[:, None].float()}
        meta = [{"video_id": f"v{i}", "source": f"val.json: {i + 1}", "frames": [0]} for i in index.tolist()]
        feats, idx, rows = gather_features(local, index, meta)
        torch.save({"feats": feats, "index": idx, "rows": rows}, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_two_gloo_ranks_gather_in_annotation_order(tmp_path):
    mp.spawn(_gather_worker, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    for rank in range(2):
        r = torch.load(tmp_path / f"rank{rank}.pt", weights_only=True)
        assert r["index"].tolist() == [0, 1, 2, 3, 4]
        torch.testing.assert_close(r["feats"]["video"], torch.arange(5.0)[:, None].repeat(1, 2))
        torch.testing.assert_close(r["feats"]["paragraph"], -torch.arange(5.0)[:, None])
        assert r["rows"] == [{"row": i, "index": i, "video_id": f"v{i}", "source": f"val.json: {i + 1}"}
                             for i in range(5)]
