"""``data.shard_order: sampler`` (``shard_map.ShardDataset``): the shards read as a map-style dataset by
seeking into their tars, through the training loop's sampler and DataLoader. For a seed the training (shuffled) and
evaluation batches are the samples of the jsonl-with-cache and LMDB paths of the same annotations, in the same order
and bit for bit; a mid-epoch resume is the rest of the epoch; forked workers open their own handles; a truncated shard
raises a ShardError naming it or is counted under ``on_error``; a version-1 index (no offsets) is read by scanning the
tar headers, without reading the members' data; the writer's index holds the offsets and resumes a version-1 run.

Data: the 18 ``lfvila_pretrain`` rows of ``tests/data/test_shards.py`` (1-5 tiny clips each) in 5 shards of 3-4
samples; the jsonl / LMDB paths read the shards' own video members, extracted, so the bytes decoded are the same."""

from __future__ import annotations

import json
import multiprocessing
import os
import shutil
import tarfile
from pathlib import Path

import pytest
import torch

from lfvila.config import load_config
from lfvila.data.samplers import EpochSampler
from lfvila.data.shard_index import INDEX_VERSION, scan_samples
from lfvila.data.shard_map import ShardDataset
from lfvila.data.shard_writer import write_shards
from lfvila.data.shards import ShardError, load_index, sample_key
from lfvila.data.text import load_tokenizer
from train import data as tdata

from ._clip_rows import FRAME, write_rows
from .test_rowstore import write_lmdb
from .test_shards import LENGTHS, _cfg

CONFIG = Path(__file__).resolve().parents[2] / "train" / "configs" / "demo_stage1.yaml"
N = len(LENGTHS)  # 18
PREPARE = dict(fps=3.0, gop=4, max_height=240)


def _extract(out: Path, src_root: Path, dst: Path) -> Path:
    """The video members of the shards in ``out`` laid out as the annotation's video folder (``<vid>/<clip_id>``)."""
    for tar_path in sorted(out.glob("shard-*.tar")):
        with tarfile.open(tar_path) as tar:
            members = {m.name: tar.extractfile(m).read() for m in tar.getmembers()}
        for name, data in members.items():
            if name.endswith(".json"):
                meta = json.loads(data)
                for member, src in zip(meta["clips"], meta["src_files"]):
                    path = dst / Path(src).relative_to(src_root)
                    path.parent.mkdir(parents=True, exist_ok=True)
                    path.write_bytes(members[member])
    return dst


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    root = tmp_path_factory.mktemp("order")
    rows = write_rows(root, LENGTHS)
    write_shards(root / "videos", root / "out", rows, "lfvila_pretrain", shard_samples=4, **PREPARE)
    _extract(root / "out", root / "videos", root / "extracted")
    values = [json.loads(line) for line in rows.read_text().splitlines()]
    write_lmdb(root / "db", dict(enumerate(values)))
    return root


def _config(root: Path, fmt: str, *extra: str):
    train = {"jsonl": root / "rows.jsonl", "lmdb": root / "db", "shards": root / "out" / "index.json"}[fmt]
    args = ["--data.format", "shards" if fmt == "shards" else "lfvila_pretrain", "--data.train", str(train),
            "--data.val", str(train), "--data.test", "null", "--data.video_root", str(root / "extracted"),
            "--data.vocab", str(root / "vocab.txt"), "--data.size", json.dumps(list(FRAME)), "--data.clips", "2",
            "--data.frames_per_clip", "2", "--data.sentences", "2", "--data.max_len", "8", "--data.flip", "true",
            "--data.backend", "pyav", "--data.num_workers", "0", "--train.batch_size", "4", "--train.seed", "7",
            "--eval.batch_size", "5", "--run.dir", str(root / "run")]
    if fmt == "jsonl":
        args += ["--data.format_kwargs", json.dumps({"cache_dir": str(root / "cache")})]
    if fmt == "shards":
        args += ["--data.shard_order", "sampler"]
    return load_config(CONFIG, [*args, *extra])


def _batches(loader) -> list[dict]:
    return [{k: b[k] for k in ("index", "video", "text_ids", "text_mask", "sentence_real")}
            | {"frames": [m["frames"] for m in b["meta"]], "clip_start": [m["clip_start"] for m in b["meta"]],
               "video_id": [m["video_id"] for m in b["meta"]]} for b in loader]  # (sources differ: line / key)


def _same(a: list[dict], b: list[dict]) -> bool:
    return len(a) == len(b) and all(
        all(torch.equal(x[k], y[k]) if isinstance(x[k], torch.Tensor) else x[k] == y[k] for k in x)
        for x, y in zip(a, b))


def _train_epoch(cfg, epoch: int, start: int = 0) -> list[dict]:
    loader, sampler = tdata.train_loader(cfg, tdata.tokenizer(cfg), rank=0, world_size=1)
    sampler.set_position(epoch, start)
    tdata.set_epoch(loader, epoch)
    return _batches(loader)


def test_jsonl_lmdb_and_shards_give_the_same_batches_in_the_same_order(built):
    root = built
    jsonl, lmdb, shards = (_config(root, f) for f in ("jsonl", "lmdb", "shards"))
    tdata.annotations(jsonl, "train")  # writes the row index cache: the loaders below read it
    assert tdata.annotations(jsonl, "train").cached
    ref = _train_epoch(jsonl, 1)
    assert len(ref) == N // 4 and all(len(b["index"]) == 4 for b in ref)
    order = [i for b in ref for i in b["index"].tolist()]
    assert order != sorted(order)  # shuffled
    assert _same(_train_epoch(lmdb, 1), ref)
    loader, sampler = tdata.train_loader(shards, tdata.tokenizer(shards), rank=0, world_size=1)
    assert isinstance(loader.dataset, ShardDataset) and isinstance(sampler, EpochSampler)
    assert _same(_train_epoch(shards, 1), ref)
    # two forked workers: the same batches; a resume at batch 2 gets the rest of the epoch
    two = _config(root, "shards", "--data.num_workers", "2")
    assert _same(_train_epoch(two, 1), ref)
    assert _same(_train_epoch(shards, 1, start=2), ref[2:])
    # evaluation: each of 2 ranks its ordered part, the same batches on every path
    for rank in range(2):
        want = _batches(tdata.eval_loader(jsonl, tdata.tokenizer(jsonl), "val", rank, 2))
        assert [i for b in want for i in b["index"].tolist()] == list(range(rank, N, 2))
        assert _same(_batches(tdata.eval_loader(shards, tdata.tokenizer(shards), "val", rank, 2)), want)
        if rank == 0:
            assert _same(_batches(tdata.eval_loader(lmdb, tdata.tokenizer(lmdb), "val", rank, 2)), want)


def _child_reads(ds: ShardDataset, index: int, conn) -> None:
    inherited = dict(ds._files)
    entry = ds.read(index)
    conn.send({"closed": all(f.closed for f in inherited.values()), "own": ds._pid == os.getpid(),
               "new": all(ds._files[n] is not f for n, f in inherited.items() if n in ds._files),
               "key": entry.key})


def test_a_forked_worker_opens_its_own_handles(built):
    root = built
    ds = ShardDataset(root / "out" / "index.json", load_tokenizer(root / "vocab.txt"), _cfg())
    ds.read(0)
    parent = ds._files["shard-000000.tar"]
    ctx = multiprocessing.get_context("fork")
    recv, send = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=_child_reads, args=(ds, 1, send))
    proc.start()
    got = recv.recv()
    proc.join()
    assert got == {"closed": True, "own": True, "new": True, "key": sample_key(1)}
    assert not parent.closed and ds._files["shard-000000.tar"] is parent and ds.read(2).key == sample_key(2)
    ds.close()
    assert parent.closed


def _copy(root: Path, dst: Path) -> Path:
    shutil.copytree(root / "out", dst, ignore=shutil.ignore_patterns(".shards", "*.jsonl"))
    return dst / "index.json"


def _as_version_1(index_path: Path) -> Path:
    index = json.loads(index_path.read_text())
    index["version"] = 1
    for s in index["shards"]:
        del s["offsets"]
    index_path.write_text(json.dumps(index))
    return index_path


def test_a_truncated_shard_raises_by_name_or_is_counted(built, tmp_path):
    root = built
    tok = load_tokenizer(root / "vocab.txt")
    index = _copy(root, tmp_path / "cut")
    shard = load_index(index)["shards"][2]  # annotation indices 7, 8, 9
    assert shard.indices == (7, 8, 9)
    tar = shard.path
    tar.write_bytes(tar.read_bytes()[: shard.offsets[2] + 700])  # sample 9 cut inside its first member
    full = ShardDataset(root / "out" / "index.json", tok, _cfg(augment=False))
    strict = ShardDataset(index, tok, _cfg(augment=False))
    for i in (7, 8):  # the samples before the cut are whole
        assert torch.equal(strict[i]["video"], full[i]["video"])
    with pytest.raises(ShardError, match=r"cut/shard-000002.tar: truncated or corrupt shard: sample 000000009 .*the "
                                         r"file ends at byte"):
        strict[9]
    skip = ShardDataset(index, tok, _cfg(augment=False, on_error="skip"))
    assert skip[9] is None and skip.skips.skipped == 1 and "shard-000002.tar: truncated" in skip.skips.reasons[0]
    assert skip.bad_shards == ["shard-000002.tar"]
    replaced = ShardDataset(index, tok, _cfg(augment=False, on_error="replace"))
    out = replaced[9]
    assert out["meta"]["replaced"] == 9 and out["index"] != 9 and replaced.skips.skipped == 1
    # a version-1 index of the cut shard: the scan finds samples 7 and 8 (9 runs past the end), no more
    v1 = ShardDataset(_as_version_1(index), tok, _cfg(augment=False))
    assert torch.equal(v1[8]["video"], full[8]["video"])
    with pytest.raises(ShardError, match="shard-000002.tar: truncated or corrupt shard: sample 000000009"):
        v1[9]
    tar.write_bytes(tar.read_bytes()[: shard.offsets[1] + 100])  # now inside sample 8's header: 8 and 9 not found
    v1 = ShardDataset(index, tok, _cfg(augment=False, on_error="skip"))
    assert v1[8] is None and "shard-000002.tar: truncated or corrupt shard" in v1.skips.reasons[0]
    assert torch.equal(v1[7]["video"], full[7]["video"])


def test_a_corrupt_member_header_or_a_left_out_sample_is_an_error(built, tmp_path):
    root = built
    tok = load_tokenizer(root / "vocab.txt")
    index = _copy(root, tmp_path / "bad")
    shard = load_index(index)["shards"][1]  # 3, 4, 5, 6
    data = bytearray(shard.path.read_bytes())
    data[shard.offsets[1] + 10] ^= 0x55  # a byte of sample 4's first header: its checksum fails
    shard.path.write_bytes(bytes(data))
    ds = ShardDataset(index, tok, _cfg(augment=False))
    with pytest.raises(ShardError, match="bad/shard-000001.tar: truncated or corrupt shard: sample 000000004"):
        ds.read(4)
    assert ds.read(5).key == sample_key(5)
    # a missing shard file, with and without offsets in the index
    load_index(index)["shards"][3].path.unlink()  # 10 .. 13
    with pytest.raises(ShardError, match="cannot read sample 000000011 .*No such file"):
        ShardDataset(index, tok, _cfg(augment=False)).read(11)
    shutil.copytree(tmp_path / "bad", tmp_path / "bad_v1")
    v1 = ShardDataset(_as_version_1(tmp_path / "bad_v1" / "index.json"), tok, _cfg(augment=False))
    with pytest.raises(ShardError, match="bad_v1/shard-000003.tar: cannot read the shard .FileNotFoundError"):
        v1.read(11)
    with pytest.raises(ShardError, match="bad_v1/shard-000001.tar: truncated or corrupt shard: sample 000000004 not "
                                         "found by the scan"):
        v1.read(4)  # the scan stops at the bad header
    # an annotation index the writer left out (a failed video): named, and counted under skip
    meta = json.loads(index.read_text())
    meta["annotation_samples"] = N + 1
    meta["failed"] = [N]
    index.write_text(json.dumps(meta))
    with pytest.raises(ShardError, match=f"annotation index {N} .* is not in the shards"):
        ShardDataset(index, tok, _cfg(augment=False)).read(N)
    skip = ShardDataset(index, tok, _cfg(augment=False, on_error="skip"))
    assert len(skip) == N + 1 and skip[N] is None and skip.skips.skipped == 1


class _Counting:
    """A binary file that counts the bytes read through it."""

    def __init__(self, path):
        self.f, self.read_bytes = open(path, "rb", buffering=0), 0

    def read(self, n=-1):
        data = self.f.read(n)
        self.read_bytes += len(data)
        return data

    def __getattr__(self, name):
        return getattr(self.f, name)


def test_a_version_1_index_reads_by_scanning_the_headers_only(built, tmp_path):
    root = built
    tok = load_tokenizer(root / "vocab.txt")
    index = load_index(root / "out" / "index.json")
    assert index["version"] == INDEX_VERSION == 2
    for shard in index["shards"]:
        counting = _Counting(shard.path)
        samples, error = scan_samples(counting)
        counting.f.close()
        assert error is None and [k for k, _, _ in samples] == [sample_key(i) for i in shard.indices]
        assert [s for _, s, _ in samples] + [samples[-1][2]] == list(shard.offsets)
        with tarfile.open(shard.path) as tar:
            members = tar.getmembers()
        assert len(members) == sum(LENGTHS[i] + 1 for i in shard.indices)  # the clips and the json of each sample
        data = sum(m.size for m in members)
        headers = sum(m.offset_data - m.offset for m in members)  # a member's header blocks (pax ones included)
        # the headers, tarfile's 1-byte probe at the end of each member's padded block and the end-of-archive block:
        # never the members' data
        assert counting.read_bytes <= headers + len(members) + 512 < headers + data, (counting.read_bytes, headers)
    old = ShardDataset(_as_version_1(_copy(root, tmp_path / "v1")), tok, _cfg())
    new = ShardDataset(root / "out" / "index.json", tok, _cfg())
    assert all(s.offsets is None for s in old.shards)
    assert (old._start == new._start).all() and (old._stop == new._stop).all()
    for ds in (old, new):
        ds.set_epoch(3)
    for i in (0, 7, 17):
        a, b = old[i], new[i]
        assert all(torch.equal(a[k], b[k]) for k in ("video", "text_ids", "text_mask", "sentence_real"))


def test_the_writer_resumes_a_version_1_run_and_adds_the_offsets(built, tmp_path):
    root = built
    out = tmp_path / "out"
    shutil.copytree(root / "out", out)
    want = json.loads((out / "index.json").read_text())
    opts = out / ".shards" / "options.json"
    opts.write_text(json.dumps({**json.loads(opts.read_text()), "version": 1}))
    for rec in (out / ".shards").glob("shard-*.json"):
        record = json.loads(rec.read_text())
        del record["offsets"]
        rec.write_text(json.dumps(record))
    (out / "index.json").unlink()
    result = write_shards(root / "videos", out, root / "rows.jsonl", "lfvila_pretrain", shard_samples=4, **PREPARE)
    assert result["kept"] == 5 and json.loads((out / "index.json").read_text()) == want
