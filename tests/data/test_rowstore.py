"""Annotation rows at scale (lfvila.data.rowstore): the official LMDB read lazily, jsonl indexed once and cached,
all giving the same samples; no per-row Python objects after loading; bad rows, a changed file, a bad cache entry
and a missing LMDB each handled by name."""

import json
import logging
import os
import pickle

import numpy as np
import pytest

from lfvila.data import rowstore
from lfvila.data.formats import build_dataset
from lfvila.data.row_parsing import AnnotationError

lmdb = pytest.importorskip("lmdb")


def official_rows(n: int, seed: int = 0) -> list[list[dict]]:
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        vid = f"yt{i:05d}x"
        rows.append([{"clip_id": f"{vid}.{k}.mp4", "text": f"row {i} clip {k} " + "word " * int(rng.integers(1, 6))}
                     for k in range(int(rng.integers(1, 9)))])
    return rows


def write_jsonl(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows), encoding="utf-8")
    return path


def write_lmdb(path, values: dict):
    """An LMDB as the official code reads it: key ``str(i)``, value the row's Python ``repr``."""
    env = lmdb.open(str(path), map_size=1 << 26)
    with env.begin(write=True) as txn:
        for key, value in values.items():
            txn.put(str(key).encode(), value if isinstance(value, bytes) else repr(value).encode())
    env.close()
    return path


def samples(ds):
    return [ds[i] for i in range(len(ds))]


def without_source(items):
    return [{k: v for k, v in s.items() if k != "source"} for s in items]


def test_jsonl_cached_and_lmdb_give_the_same_samples(tmp_path):
    rows = official_rows(40)
    src = write_jsonl(tmp_path / "p.jsonl", rows)
    db = write_lmdb(tmp_path / "db", dict(enumerate(rows)))
    plain = build_dataset("lfvila_pretrain", src, tmp_path / "clips")
    first = build_dataset("lfvila_pretrain", src, tmp_path / "clips", cache_dir=tmp_path / "cache")
    again = build_dataset("lfvila_pretrain", src, tmp_path / "clips", cache_dir=tmp_path / "cache")
    from_db = build_dataset("lfvila_pretrain", db, tmp_path / "clips")
    assert not first.cached and again.cached and len(plain) == len(from_db) == 40
    assert samples(plain) == samples(first) == samples(again)
    assert without_source(samples(from_db)) == without_source(samples(plain))
    assert from_db[3]["source"] == f"{db}: key '3'" and plain[3]["source"].endswith("p.jsonl: line 4")
    got = plain[7]
    assert [s.text for s in got["segments"]] == [r["text"].strip().replace("  ", " ") for r in rows[7]]
    assert got["clips"] == [str(tmp_path / "clips" / "yt00007x" / r["clip_id"]) for r in rows[7]]


def test_no_python_object_per_row_after_loading(tmp_path):
    """The loaded dataset pickles (as a DataLoader worker under spawn gets it) to a few int64 a row: no row's
    text, dict or path stays in memory; a list of sample dicts would take hundreds of bytes a row."""
    rows = official_rows(3000)
    src = write_jsonl(tmp_path / "p.jsonl", rows)
    ds = build_dataset("lfvila_pretrain", src, tmp_path / "clips")
    assert isinstance(ds._store, rowstore.LineIndex)
    size = len(pickle.dumps(ds))
    assert size < 3000 * 3 * 8 + 20_000, size
    assert len(pickle.dumps(samples(ds))) > 10 * size  # what holding the samples costs, for scale
    back = pickle.loads(pickle.dumps(ds))
    assert back[2999] == ds[2999]


def test_lmdb_is_lazy_bad_rows_raise_by_key(tmp_path):
    rows = official_rows(6)
    values = dict(enumerate(rows))
    values[2] = b"__import__('os').system('echo pwned')"
    values[4] = [{"clip_id": "a.0.mp4"}]  # no text
    db = write_lmdb(tmp_path / "db", values)
    ds = build_dataset("lfvila_pretrain", db, tmp_path / "clips")  # nothing parsed yet: opens fine
    assert len(ds) == 6 and ds[0]["video_id"] == "yt00000x" and ds[-1]["video_id"] == "yt00005x"
    with pytest.raises(AnnotationError, match=r"db: key '2': .*code is refused") as err:
        ds[2]
    assert err.value.reason == "malformed literal"
    with pytest.raises(AnnotationError, match=r"key '4': .*text") as err:
        ds[4]
    with pytest.raises(IndexError):
        ds[6]


def test_lmdb_num_rows_missing_keys_and_missing_folder(tmp_path):
    rows = official_rows(8)
    db = write_lmdb(tmp_path / "db", {k: rows[k] for k in (0, 1, 3, 4, 7)})  # 5 entries, key '2' absent
    ds = build_dataset("lfvila_pretrain", db, tmp_path / "clips", num_rows=3)
    assert len(ds) == 3
    with pytest.raises(AnnotationError, match=r"key '2': no such key") as err:
        ds[2]
    assert err.value.reason == "missing key"
    with pytest.raises(ValueError, match=r"num_rows must be in \[1, 5\]"):
        build_dataset("lfvila_pretrain", db, tmp_path / "clips", num_rows=6)
    (tmp_path / "empty").mkdir()
    with pytest.raises(AnnotationError, match=r"empty: file: a folder, not an annotation file or an LMDB"):
        build_dataset("lfvila_pretrain", tmp_path / "empty", tmp_path / "clips")
    with pytest.raises(AnnotationError, match="a folder, not an annotation file"):
        build_dataset("lfvila_retrieval", db, tmp_path / "clips")  # only the pretraining format has an LMDB
    with pytest.raises(FileNotFoundError, match="annotation file not found"):
        build_dataset("lfvila_pretrain", tmp_path / "nope.jsonl", tmp_path / "clips")


def test_lmdb_env_is_opened_per_process(tmp_path):
    """The environment is not pickled with the dataset (spawned workers) and is reopened after fork."""
    db = write_lmdb(tmp_path / "db", dict(enumerate(official_rows(3))))
    ds = build_dataset("lfvila_pretrain", db, tmp_path / "clips")
    ds[0]
    state = pickle.dumps(ds)
    assert b"_env_obj" not in state
    assert pickle.loads(state)[1] == ds[1]
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: a forked DataLoader worker
        try:
            ok = ds[2]["video_id"] == "yt00002x" and ds._store._env_pid == os.getpid()
        except BaseException:
            ok = False
        os.write(write, b"1" if ok else b"0")
        os._exit(0)
    os.waitpid(pid, 0)
    assert os.read(read, 1) == b"1"
    assert ds[1]["video_id"] == "yt00001x"  # the parent's environment still reads after the child closed its copy


def _mapped_kb(path) -> int:
    """Rss (kB) of this process's mappings of the file ``path`` (``/proc/self/smaps``)."""
    st, total, inside = os.stat(path), 0, False
    with open("/proc/self/smaps") as f:
        for line in f:
            fields = line.split()
            if "-" in fields[0] and len(fields) >= 5 and ":" in fields[3]:  # a mapping's header line
                inside = fields[4] == str(st.st_ino)
            elif inside and fields[0] == "Rss:":
                total += int(fields[1])
    return total


@pytest.mark.skipif(not os.path.exists("/proc/self/smaps"), reason="needs Linux /proc")
def test_lmdb_reads_leave_no_pages_of_the_map_mapped(tmp_path):
    """Each read unmaps the pages of data.mdb again (release_maps: else fault-around maps 64 KB a random read into
    each worker, Rss growing to the file's size); the rows read are the LMDB's bytes, read again the same."""
    rows = official_rows(3000)
    rows = [r + [{"clip_id": f"pad{i}.9.mp4", "text": "x" * 900}] for i, r in enumerate(rows)]  # ~1 KB a row
    db = write_lmdb(tmp_path / "db", dict(enumerate(rows)))
    data = db / "data.mdb"
    assert data.stat().st_size > 3_000_000
    with open(data, "rb") as f:  # the file in the page cache: what fault-around maps
        f.read()
    store = rowstore.LmdbRows(db)
    assert store._env_maps and rowstore.file_maps(data) == store._env_maps
    order = np.random.default_rng(1).permutation(3000)
    got = [store.read(int(i)) for i in order]
    assert _mapped_kb(data) <= 64, _mapped_kb(data)
    assert got == [repr(rows[int(i)]).encode() for i in order]  # what write_lmdb stored
    with store._env().begin() as txn:  # the same reads straight from the environment, without the release
        assert [txn.get(str(int(i)).encode()) for i in order] == got
        assert _mapped_kb(data) > 1000  # ... keep their pages mapped, for scale
    assert [store.read(int(i)) for i in order[:50]] == got[:50]
    assert store.read(5000) is None
    rowstore.release_maps(())  # nothing known: a no-op


def test_jsonl_bad_rows_skip_and_cache_keeps_the_counts(tmp_path, caplog):
    rows = [json.dumps(r) for r in official_rows(30)]
    rows[5] = "{not json"
    rows[11] = json.dumps([{"clip_id": "../evil.0.mp4", "text": "x"}])
    src = write_jsonl(tmp_path / "p.jsonl", rows)
    kw = dict(on_error="skip", max_skip_fraction=0.1, cache_dir=tmp_path / "cache")
    with caplog.at_level(logging.WARNING):
        first = build_dataset("lfvila_pretrain", src, tmp_path / "clips", **kw)
    assert "line 6" in caplog.text and "line 12" in caplog.text
    again = build_dataset("lfvila_pretrain", src, tmp_path / "clips", **kw)
    assert again.cached and len(again) == len(first) == 28
    assert again.skipped == 2 and again.skip_reasons == first.skip_reasons
    assert samples(again) == samples(first)
    with pytest.raises(AnnotationError, match="line 6: neither JSON nor a Python literal"):  # on_error: in the key
        build_dataset("lfvila_pretrain", src, tmp_path / "clips", cache_dir=tmp_path / "cache")
    with pytest.raises(AnnotationError, match="too many skips|max_skip_fraction"):  # the cap applies to a hit too
        build_dataset("lfvila_pretrain", src, tmp_path / "clips", on_error="skip", max_skip_fraction=0.05,
                      cache_dir=tmp_path / "cache")


def test_cache_follows_the_file_and_the_options(tmp_path):
    rows = official_rows(10)
    src = write_jsonl(tmp_path / "p.jsonl", rows)
    cache = tmp_path / "cache"
    build_dataset("lfvila_pretrain", src, tmp_path / "clips", cache_dir=cache)
    assert build_dataset("lfvila_pretrain", src, tmp_path / "clips", cache_dir=cache).cached
    assert not build_dataset("lfvila_pretrain", src, tmp_path / "other", cache_dir=cache).cached  # video_root
    assert not build_dataset("lfvila_pretrain", src, tmp_path / "clips", cache_dir=cache,
                             check_files=False, video_exts=(".mkv",)).cached
    write_jsonl(src, rows[:7])  # the file changes: another size and mtime
    ds = build_dataset("lfvila_pretrain", src, tmp_path / "clips", cache_dir=cache)
    assert not ds.cached and len(ds) == 7
    for entry in cache.glob("*.npy"):  # a damaged table is ignored, and the index rebuilt
        entry.write_bytes(b"garbage")
    ds = build_dataset("lfvila_pretrain", src, tmp_path / "clips", cache_dir=cache)
    assert not ds.cached and len(ds) == 7 and ds[6]["video_id"] == "yt00006x"
    assert not list(cache.glob(".*")), "no temporary file is left behind"


def test_changed_file_after_indexing_raises_not_other_rows(tmp_path):
    src = write_jsonl(tmp_path / "p.jsonl", official_rows(4))
    ds = build_dataset("lfvila_pretrain", src, tmp_path / "clips")
    write_jsonl(src, official_rows(4, seed=1))
    with pytest.raises(OSError, match="changed since it was indexed"):
        ds[0]


def test_whole_file_formats_are_packed(tmp_path):
    data = {f"v_{i}": {"duration": 10.0, "timestamps": [[0, 5], [5, 10]], "sentences": [f"a{i}", f"b{i}"]}
            for i in range(50)}
    path = tmp_path / "a.json"
    path.write_text(json.dumps(data))
    ds = build_dataset("activitynet_captions", path, tmp_path / "vid")
    assert isinstance(ds._store, rowstore.PackedRows) and len(ds) == 50
    assert ds[49]["text"] == "a49 b49" and ds[-1] == ds[49]
    assert ds[3] is not ds[3] and ds[3] == ds[3]  # a fresh dict every time
