"""Tar shards (``python -m lfvila.data.prepare --shards``, ``lfvila.data.shards.ShardStream``): the members, index and
report the writer makes, failed videos left out, the stream's samples equal to ``VideoTextDataset``'s bit for bit,
seeded orders, equal work and an exact mid-epoch resume over 2 gloo ranks x 2 workers, truncated shards reported,
bad samples skipped or replaced, too many slots refused.

Data: 18 ``lfvila_pretrain`` rows of 1-5 tiny clips (48 x 64, 6 frames, ``tests/data/_clip_rows.py``) in 9 shards of
2 samples; a 4-video ``generic_jsonl`` set for the single-video layout and failures."""

from __future__ import annotations

import json
import logging
import os
import shutil
import socket
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch

from lfvila.data.decode import probe
from lfvila.data.encode import write_video
from lfvila.data.formats import build_dataset
from lfvila.data.loader import LoaderConfig, VideoTextDataset
from lfvila.data.prepare import main, prepare_one
from lfvila.data.shards import ShardError, ShardStream, build_shard_loader, load_index, sample_key
from lfvila.data.text import load_tokenizer

from ._clip_rows import FRAME, clip_file, write_rows

LENGTHS = [1, 2, 3, 4, 5] * 3 + [2, 4, 1]  # 18 rows
OPTS = ["--fps", "3", "--gop", "4", "--max-height", "240"]


def _cfg(**kw) -> LoaderConfig:
    base = dict(size=FRAME, clips=2, frames_per_clip=2, max_len=8, train=True, max_skip_fraction=1.0)
    return LoaderConfig(**{**base, **kw})


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    root = tmp_path_factory.mktemp("shards")
    rows = write_rows(root, LENGTHS)
    rc = main([str(root / "videos"), str(root / "out"), "--shards", "--annotations", str(rows), "--format",
               "lfvila_pretrain", "--shard-samples", "2", "--workers", "2", *OPTS])
    assert rc == 0
    return root, load_tokenizer(root / "vocab.txt")


def _members(tar_path: Path) -> dict[str, bytes]:
    with tarfile.open(tar_path) as t:
        return {m.name: t.extractfile(m).read() for m in t.getmembers()}


def _extract(root: Path, dst: Path) -> Path:
    """The shards' video members laid out as the annotation's video folder (``<vid>/<clip_id>``)."""
    for tar in sorted((root / "out").glob("shard-*.tar")):
        members = _members(tar)
        for name, data in members.items():
            if name.endswith(".json"):
                meta = json.loads(data)
                for member, src in zip(meta["clips"], meta["src_files"]):
                    out = dst / Path(src).relative_to(root / "videos")
                    out.parent.mkdir(parents=True, exist_ok=True)
                    out.write_bytes(members[member])
    return dst


def test_writer_members_index_and_report(built, tmp_path):
    root, _ = built
    index = json.loads((root / "out" / "index.json").read_text())
    assert (index["samples"], index["annotation_samples"], index["failed"], index["mode"]) == (18, 18, [], "paragraph")
    assert index["prepare"] == {"fps": 3.0, "gop": 4, "max_height": 240, "codec": "h264", "crf": 18}
    assert [(s["name"], s["samples"], s["indices"]) for s in index["shards"]] == [
        (f"shard-{j:06d}.tar", 2, [[2 * j, 2 * j + 2]]) for j in range(9)]
    for j, shard in enumerate(index["shards"]):
        members = _members(root / "out" / shard["name"])
        assert shard["bytes"] == (root / "out" / shard["name"]).stat().st_size
        want = {f"{sample_key(i)}.json" for i in (2 * j, 2 * j + 1)}
        want |= {f"{sample_key(i)}.{k}.mp4" for i in (2 * j, 2 * j + 1) for k in range(LENGTHS[i])}
        assert set(members) == want
        for i in (2 * j, 2 * j + 1):
            meta = json.loads(members[f"{sample_key(i)}.json"])
            assert meta["index"] == i and meta["video"] == sample_key(i) and meta["video_id"] == f"yt{i}"
            assert meta["clips"] == [f"{sample_key(i)}.{k}.mp4" for k in range(LENGTHS[i])]
            assert meta["segments"] == [[f"clip{k}", None, None] for k in range(LENGTHS[i])]
    # a member is what prepare_one makes of its clip (same recipe), bit for bit
    ref = prepare_one(clip_file(root, 4, 3), tmp_path / "ref.mp4", fps=3, gop=4, max_height=240)
    assert ref["status"] == "ok"
    members = _members(root / "out" / "shard-000002.tar")
    assert members[f"{sample_key(4)}.3.mp4"] == (tmp_path / "ref.mp4").read_bytes()
    info = probe(tmp_path / "ref.mp4")
    assert (info.num_frames, info.fps, (info.height, info.width)) == (6, 3.0, FRAME)
    rows = [json.loads(line) for line in (root / "out" / "prepare_report.jsonl").read_text().splitlines()]
    assert len(rows) == sum(LENGTHS) and {(r["status"], r["sample"]) for r in rows} == {("ok", "written")}
    assert rows[-1]["output"] == f"shard-000008.tar/{sample_key(17)}.0.mp4"
    assert not [p for p in (root / "out").iterdir() if p.name.startswith(".") and p.name != ".shards"]


def test_failed_videos_leave_their_samples_out_and_a_rerun_resumes(tmp_path):
    # single-video format: <key>.mp4; a corrupt and a missing video
    vids = tmp_path / "vids"
    vids.mkdir()
    for name in ("a", "d"):
        write_video(vids / f"{name}.mp4", np.full((6, *FRAME, 3), 90, np.uint8), fps=3.0, codec="h264", gop=2)
    (vids / "b.mp4").write_bytes(b"\x00" * 300)
    ann = tmp_path / "ann.jsonl"
    ann.write_text("".join(json.dumps({"video": f"{v}.mp4", "sentences": [f"s {v}"]}) + "\n" for v in "abcd"))
    out = tmp_path / "single"
    args = [str(vids), str(out), "--shards", "--annotations", str(ann), "--format", "generic_jsonl",
            "--shard-size", "1M", "--workers", "1", *OPTS]
    assert main(args) == 1
    index = load_index(out / "index.json")
    assert (index["samples"], index["failed"]) == (2, [1, 2])
    assert [s.indices for s in index["shards"]] == [(0, 3)]
    assert set(_members(out / "shard-000000.tar")) == {f"{sample_key(i)}.{e}" for i in (0, 3) for e in ("json", "mp4")}
    rows = {r["path"]: r for r in map(json.loads, (out / "prepare_report.jsonl").read_text().splitlines())}
    assert rows["b.mp4"]["status"] == "failed" and "cannot open" in rows["b.mp4"]["reason"]
    assert rows["c.mp4"]["status"] == "failed" and rows["c.mp4"]["sample"] == "left out"
    assert rows["a.mp4"]["output"] == f"shard-000000.tar/{sample_key(0)}.mp4"
    # a rerun keeps the finished shard; other options are refused
    mtime = (out / "shard-000000.tar").stat().st_mtime_ns
    assert main(args) == 1 and (out / "shard-000000.tar").stat().st_mtime_ns == mtime
    with pytest.raises(SystemExit):
        main([*args, "--crf", "20"])

    # a pretraining row with one bad clip: the whole sample is left out, never a partial one
    root = tmp_path / "rows"
    rows_file = write_rows(root, [2, 3, 1])
    clip_file(root, 1, 2).write_bytes(b"")
    assert main([str(root / "videos"), str(root / "out"), "--shards", "--annotations", str(rows_file), "--format",
                 "lfvila_pretrain", "--workers", "1", *OPTS]) == 1
    index = load_index(root / "out" / "index.json")
    assert index["failed"] == [1] and [s.indices for s in index["shards"]] == [(0, 2)]
    assert not [n for n in _members(root / "out" / "shard-000000.tar") if n.startswith(sample_key(1))]
    report = [json.loads(line) for line in (root / "out" / "prepare_report.jsonl").read_text().splitlines()]
    assert [(r["index"], r["status"], r["sample"]) for r in report if r["index"] == 1] == [
        (1, "ok", "left out"), (1, "ok", "left out"), (1, "failed", "left out")]


def test_stream_gives_the_dataset_samples_bit_for_bit(built, tmp_path):
    root, tok = built
    ann = build_dataset("lfvila_pretrain", root / "rows.jsonl", _extract(root, tmp_path / "videos"))
    cfg = _cfg()  # train: jittered frames, random clip window, crop and flip
    scratch = tmp_path / "scratch"  # its own (other tests, in other xdist workers, use /dev/shm meanwhile)
    scratch.mkdir()
    stream = ShardStream(root / "out" / "index.json", tok, cfg, batch_size=2, shuffle=False, scratch=scratch)
    stream.set_position(3)
    ref = VideoTextDataset(ann, tok, cfg)
    ref.set_epoch(3)
    got = list(stream)
    assert len(got) == len(stream) == 18 and stream.batches_per_epoch() == 9
    assert [s["index"] for s in got] == list(range(18))
    for s in got:
        r = ref[s["index"]]
        for key in ("video", "text_ids", "text_mask", "sentence_real"):
            assert torch.equal(s[key], r[key]), key
        assert s["meta"]["frames"] == r["meta"]["frames"] and s["meta"]["clip_start"] == r["meta"]["clip_start"]
        assert s["meta"]["shard"] == f"shard-{s['index'] // 2:06d}.tar"
    assert not list(scratch.glob("lfvila-shards-*/*/*"))  # members deleted


def _order(built, seed: int, epoch: int, workers: int = 0) -> list[int]:
    root, tok = built
    loader = build_shard_loader(root / "out" / "index.json", tok, _cfg(seed=seed, augment=False, clips=1,
                                                                       frames_per_clip=1), 2, num_workers=workers,
                                buffer=4)
    loader.dataset.set_position(epoch)
    return [i for batch in loader for i in batch["index"].tolist()]


def test_the_order_is_a_function_of_seed_and_epoch(built):
    first = _order(built, 0, 1)
    assert len(first) == len(set(first)) == 18
    assert _order(built, 0, 1) == first
    assert _order(built, 1, 1) != first and _order(built, 0, 2) != first
    two = _order(built, 0, 1, workers=2)  # 2 slots of 4-5 shards: 8 samples each, the rest dropped
    assert len(two) == len(set(two)) == 16 and two == _order(built, 0, 1, workers=2)


def test_too_many_slots_or_too_small_shards_are_refused(built):
    root, tok = built
    with pytest.raises(ValueError, match="10 slots .* only 9 shards"):
        ShardStream(root / "out" / "index.json", tok, _cfg(), 2, rank=0, world_size=5, num_workers=2)
    with pytest.raises(ValueError, match="fewer than batch_size 5"):
        ShardStream(root / "out" / "index.json", tok, _cfg(), 5, world_size=2, num_workers=2)
    with pytest.raises(ValueError, match="num_workers=2 is read by 1"):
        next(iter(ShardStream(root / "out" / "index.json", tok, _cfg(), 2, num_workers=2)))
    eval_stream = ShardStream(root / "out" / "index.json", tok, _cfg(train=False), 2, rank=4, world_size=5,
                              num_workers=2)  # evaluation: empty slots are fine
    assert len(eval_stream) == 2


def _copy(root: Path, dst: Path) -> Path:
    shutil.copytree(root / "out", dst, ignore=shutil.ignore_patterns(".shards", "*.jsonl"))
    return dst / "index.json"


def test_a_truncated_shard_is_reported_by_name(built, tmp_path, caplog):
    root, tok = built
    index = _copy(root, tmp_path / "cut")
    tar = tmp_path / "cut" / "shard-000004.tar"
    tar.write_bytes(tar.read_bytes()[: tar.stat().st_size // 2])
    stream = ShardStream(index, tok, _cfg(on_error="skip", augment=False), 2, shuffle=False)
    with caplog.at_level(logging.WARNING, logger="lfvila.data.shards"):
        got = list(stream)
    assert stream.bad_shards == ["shard-000004.tar"] and stream.lost_samples in (1, 2)
    lost = {8, 9} if stream.lost_samples == 2 else {9}
    assert [s["index"] for s in got if s is not None] == [i for i in range(18) if i not in lost]
    assert len(got) == 18 and got[-len(lost):] == [None] * len(lost)  # the quota is kept: no rank waits for another
    assert any("shard-000004.tar" in r.getMessage() and "truncated" in r.getMessage() for r in caplog.records)
    with pytest.raises(ShardError, match="shard-000004.tar: truncated"):
        list(ShardStream(index, tok, _cfg(augment=False), 2, shuffle=False))


def test_a_bad_sample_is_skipped_or_replaced_by_the_next_of_its_stream(built, tmp_path):
    import webdataset as wds

    root, tok = built
    index = _copy(root, tmp_path / "bad")
    tar = tmp_path / "bad" / "shard-000001.tar"
    members = _members(tar)
    for k in range(LENGTHS[2]):
        members[f"{sample_key(2)}.{k}.mp4"] = b"\x00" * 64  # sample 2's clips are garbage
    with open(tar, "wb") as f, wds.TarWriter(f, encoder=False) as w:
        for i in (2, 3):
            key = sample_key(i)
            w.write({"__key__": key, **{n[len(key) + 1:]: v for n, v in members.items() if n.startswith(key)}})
    skipped = list(ShardStream(index, tok, _cfg(on_error="skip", augment=False), 2, shuffle=False))
    assert [s and s["index"] for s in skipped] == [0, 1, None, *range(3, 18)]
    replaced = list(ShardStream(index, tok, _cfg(on_error="replace", augment=False), 2, shuffle=False))
    assert [s and s["index"] for s in replaced] == [0, 1, *range(3, 18), None]
    assert replaced[2]["meta"]["replaced"] == 2


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank(rank: int, world: int, port: int, index: str, vocab: str, out: str) -> None:
    """One of ``world`` gloo ranks: the epoch's batches with 2 workers, then the epoch resumed at batch 1."""
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.set_num_threads(1)
    tok = load_tokenizer(vocab)
    cfg = _cfg(augment=False, clips=1, frames_per_clip=1)

    def epoch(start: int):
        loader = build_shard_loader(index, tok, cfg, 2, num_workers=2, rank=rank, world_size=world, buffer=3)
        loader.dataset.set_position(1, start)
        loader.set_epoch(1)
        return [b["index"].tolist() for b in loader], loader.dataset.batches_per_epoch()

    (full, n), (resumed, _) = epoch(0), epoch(1)
    seen = [None] * world
    dist.all_gather_object(seen, {"full": full, "resumed": resumed, "batches": n})
    if rank == 0:
        Path(out).write_text(json.dumps(seen))
    dist.destroy_process_group()


def test_two_ranks_two_workers_equal_work_and_an_exact_resume(built, tmp_path):
    root, _ = built
    out = tmp_path / "ranks.json"
    torch.multiprocessing.spawn(_rank, args=(2, _free_port(), str(root / "out" / "index.json"),
                                             str(root / "vocab.txt"), str(out)), nprocs=2, join=True)
    ranks = json.loads(out.read_text())
    # 4 slots over 9 shards of 2: each slot yields 4 samples (the sum of the 2 smallest shards), the 5th shard dropped
    assert [len(r["full"]) for r in ranks] == [r["batches"] for r in ranks] == [4, 4]
    seen = [i for r in ranks for batch in r["full"] for i in batch]
    assert len(seen) == len(set(seen)) == 16 and all(len(b) == 2 for r in ranks for b in r["full"])
    for r in ranks:
        assert r["resumed"] == r["full"][1:]  # the rest of the epoch, in the uninterrupted order
