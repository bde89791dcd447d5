"""Where an annotation dataset keeps its rows once loaded: flat arrays, no Python object per row.

A dataset of the official 8.5M-row pretraining corpus held as Python dicts costs about 4.4 KB a row (37 GB), and
every DataLoader worker that reads them writes their reference counts, so copy-on-write duplicates those pages in
each worker. The stores here keep a handful of objects whatever the row count: numpy arrays and one buffer, whose
pages a forked worker only reads. A row is turned back into a sample when it is asked for.

* :class:`LineIndex`: the good rows of a text file with one row per line (jsonl): byte offset, byte length and line
  number of each row in three int64 arrays. A row is read back with one seek and read and parsed again on access.
  The file's size and mtime are recorded; a file changed since it was indexed raises rather than give other rows.
* :class:`PackedRows`: formats whose rows are not lines (one JSON document, CSV): each parsed sample pickled into
  one bytes buffer, with an int64 array of offsets.
* :class:`LmdbRows`: the official LMDB (key ``str(i)``, value the row); the environment is opened read-only with
  ``lock=False`` in each process on first use, so a forked worker opens its own; rows are read on access, and the
  pages of the memory map a read touched are unmapped from the process after it (:func:`release_maps`: why).

:func:`save_index` / :func:`load_index` keep a :class:`LineIndex` and the load's counts in a cache folder, keyed by
the file's path, size and mtime, the dataset's options and :data:`INDEX_VERSION`, so a large jsonl is parsed once.
"""

from __future__ import annotations

import ctypes
import hashlib
import json
import mmap
import os
import pickle
from array import array
from pathlib import Path

import numpy as np

INDEX_VERSION = 1  # bump when a cached index's meaning changes (the parse rules of a format, the file layout)


def file_stamp(path) -> tuple[int, int]:
    """``(size, mtime_ns)`` of a file: what a cached index is checked against."""
    st = os.stat(path)
    return st.st_size, st.st_mtime_ns


class LineIndex:
    """Good rows of a line-per-row text file: ``offsets``, ``lengths`` (bytes, without the newline) and ``lines``
    (1-based line numbers, for error messages), each an int64 array of one entry per row."""

    def __init__(self, path, offsets, lengths, lines, stamp: tuple[int, int]):
        self.path = str(path)
        self.offsets, self.lengths, self.lines = (np.asarray(a, dtype=np.int64) for a in (offsets, lengths, lines))
        if not len(self.offsets) == len(self.lengths) == len(self.lines):
            raise ValueError("offsets, lengths and lines must have one entry per row")
        self.stamp = tuple(stamp)

    def __len__(self) -> int:
        return len(self.offsets)

    def label(self, i: int) -> str:
        return f"line {int(self.lines[i])}"

    def read(self, i: int) -> bytes:
        """Row ``i``'s bytes. Raises OSError when the file changed (size or mtime) since it was indexed."""
        if file_stamp(self.path) != self.stamp:
            raise OSError(f"{self.path}: the annotation file changed since it was indexed "
                          f"(size, mtime_ns {self.stamp} -> {file_stamp(self.path)}); build the dataset again")
        with open(self.path, "rb") as f:
            f.seek(int(self.offsets[i]))
            return f.read(int(self.lengths[i]))


class LineIndexBuilder:
    """Collects a :class:`LineIndex` row by row in compact arrays (16 bytes of int64 a row, no objects)."""

    def __init__(self):
        self.offsets, self.lengths, self.lines = array("q"), array("q"), array("q")

    def add(self, offset: int, length: int, line: int) -> None:
        self.offsets.append(offset)
        self.lengths.append(length)
        self.lines.append(line)

    def build(self, path, stamp: tuple[int, int]) -> LineIndex:
        return LineIndex(path, np.frombuffer(self.offsets, dtype=np.int64), np.frombuffer(self.lengths, np.int64),
                         np.frombuffer(self.lines, dtype=np.int64), stamp)


def iter_lines(path):
    """``(line number from 1, byte offset, line bytes without the newline)`` for every non-blank line of a file,
    read in buffered chunks (the whole file is never held)."""
    offset = 0
    with open(path, "rb") as f:
        for n, raw in enumerate(f, start=1):
            size = len(raw)
            body = raw[:-1] if raw.endswith(b"\n") else raw
            if body.endswith(b"\r"):
                body = body[:-1]
            if body.strip():
                yield n, offset, body
            offset += size


class PackedRows:
    """Samples pickled one after another into one buffer; ``offsets[i]:offsets[i + 1]`` is sample ``i``. Filled with
    :meth:`add`, then :meth:`freeze` turns the buffer into bytes and the offsets into an int64 array."""

    def __init__(self):
        self._buf = bytearray()
        self._offsets = array("q", [0])

    def add(self, sample) -> None:
        self._buf += pickle.dumps(sample, protocol=pickle.HIGHEST_PROTOCOL)
        self._offsets.append(len(self._buf))

    def freeze(self) -> PackedRows:
        self._buf, self._offsets = bytes(self._buf), np.array(self._offsets, dtype=np.int64)
        return self

    def __len__(self) -> int:
        return len(self._offsets) - 1

    def get(self, i: int):
        return pickle.loads(self._buf[int(self._offsets[i]):int(self._offsets[i + 1])])


_OPEN_ENVS: dict = {}  # real path -> (pid, environment, maps of data.mdb): what this process (or its parent) opened


def file_maps(path) -> tuple[tuple[int, int], ...]:
    """``(start, length)`` of each memory mapping of the file ``path`` in this process, from ``/proc/self/maps``
    (matched by device and inode); ``()`` where there is none or no ``/proc`` (not Linux)."""
    try:
        st = os.stat(path)
        found = []
        with open("/proc/self/maps") as f:
            for line in f:
                fields = line.split(None, 5)
                if len(fields) < 5 or int(fields[4]) != st.st_ino:
                    continue
                major, minor = (int(x, 16) for x in fields[3].split(":"))
                if (major, minor) == (os.major(st.st_dev), os.minor(st.st_dev)):
                    lo, hi = (int(x, 16) for x in fields[0].split("-"))
                    found.append((lo, hi - lo))
        return tuple(found)
    except (OSError, ValueError):
        return ()


_madvise = None


def release_maps(maps) -> None:
    """Unmap from this process the pages it has mapped of each ``(start, length)`` of a read-only file mapping
    (``madvise(MADV_DONTNEED)``); the next access maps them again from the page cache, with the same bytes.

    Why, for the LMDB: LMDB reads through a shared memory map of data.mdb, and every page fault on it maps the page
    asked for and, by the kernel's fault-around (``fault_around_bytes``, 64 KB by default, a global debugfs knob),
    the up to 16 pages around it that are in the page cache. ``readahead=False`` (``MDB_NORDAHEAD``:
    ``MADV_RANDOM``) stops the reads from disk around a fault, not this mapping of cached pages: with data.mdb in
    the page cache, 8 DataLoader workers x 1,000 random rows of 200k grew by 434-563 MB of Rss (about 70 KB a row
    a worker, all of it file pages; Private_Dirty +9.5 MB), and a long epoch maps the whole file into every worker.
    Those pages are shared page cache, not memory a worker owns, but per-process accounting (Rss: ``ps``, top,
    schedulers that sum Rss) charges them to each worker. Dropping the mapping after each read keeps that growth
    near zero (the same 8 x 1,000 reads: RssFile +0.5 MB in all) for about 25 us a read (the next read faults its
    few B-tree pages in again); the page cache itself, and so the machine's memory, is the same either way. A no-op
    where the maps are unknown."""
    global _madvise
    if not maps:
        return
    if _madvise is None:
        try:
            fn = ctypes.CDLL(None, use_errno=True).madvise
            fn.argtypes, fn.restype = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int), ctypes.c_int
            _madvise = (fn, mmap.MADV_DONTNEED)
        except (OSError, AttributeError):
            _madvise = False
    if _madvise:
        fn, advice = _madvise
        for start, length in maps:
            fn(start, length, advice)  # read-only file pages: nothing is lost; a failure leaves them mapped


class LmdbRows:
    """Rows of an LMDB environment keyed ``str(i)`` for ``i < num_rows`` (the official pretraining layout).

    ``num_rows``: the dataset's length (the official config's ``len_lmdb_train_data``); default: the number of
    entries. The environment is opened lazily in each process (read-only, ``lock=False``, no readahead) and never
    pickled, so DataLoader workers open their own after fork or spawn. After each read the pages of the map are
    unmapped from the process again (:func:`release_maps`), so a worker's Rss does not grow with the rows read."""

    def __init__(self, path, num_rows: int | None = None):
        self.path = str(path)
        if not Path(self.path, "data.mdb").is_file():
            raise FileNotFoundError(f"LMDB not found: {self.path} (a folder holding data.mdb)")
        entries = int(self._env().stat()["entries"])
        if num_rows is not None and not 0 < num_rows <= entries:
            raise ValueError(f"num_rows must be in [1, {entries}] for {self.path} ({entries} entries), got {num_rows}")
        self.num_rows = entries if num_rows is None else int(num_rows)
        if self.num_rows == 0:
            raise ValueError(f"{self.path}: the LMDB holds no rows")

    def _env(self):
        env = self.__dict__.get("_env_obj")
        if env is not None and self.__dict__.get("_env_pid") == os.getpid():
            return env
        path = os.path.realpath(self.path)
        pid, env, maps = _OPEN_ENVS.get(path, (None, None, ()))
        if pid != os.getpid():
            if env is not None:  # inherited through fork: LMDB forbids using it here, so drop this copy of it
                env.close()
            import lmdb

            env = lmdb.open(self.path, readonly=True, lock=False, readahead=False, meminit=False, subdir=True,
                            max_readers=512)
            maps = file_maps(os.path.join(path, "data.mdb"))
            _OPEN_ENVS[path] = (os.getpid(), env, maps)  # one environment per file and process: copies share it
        self._env_obj, self._env_pid, self._env_maps = env, os.getpid(), maps
        return env

    def __getstate__(self):
        return {k: v for k, v in self.__dict__.items() if k not in ("_env_obj", "_env_pid", "_env_maps")}

    def __len__(self) -> int:
        return self.num_rows

    @staticmethod
    def label(i: int) -> str:
        return f"key {str(i)!r}"

    def read(self, i: int) -> bytes | None:
        """Row ``i``'s value (a copy: ``buffers=False``), or ``None`` when the key is missing."""
        with self._env().begin(buffers=False) as txn:
            value = txn.get(str(i).encode())
        release_maps(self._env_maps)  # after the transaction: no buffer into the map is held
        return value


# ---------------------------------------------------------------------------------------------------- cache


def cache_key(fields: dict) -> str:
    return hashlib.sha256(json.dumps(fields, sort_keys=True, default=str).encode()).hexdigest()[:24]


def save_index(cache_dir, name: str, key_fields: dict, index: LineIndex, stats: dict) -> Path:
    """Write ``index`` and the load's ``stats`` (JSON-able) to ``cache_dir``: ``<name>-<key>.npy`` (an ``(N, 3)``
    int64 array: offset, length, line) and ``<name>-<key>.json`` (the key fields, the file stamp and the stats),
    each written to a temporary name and renamed, the JSON last, so a reader sees a whole entry or none."""
    folder = Path(cache_dir)
    folder.mkdir(parents=True, exist_ok=True)
    stem = f"{name}-{cache_key(key_fields)}"
    table = np.stack([index.offsets, index.lengths, index.lines], axis=1)
    tmp = folder / f".{stem}.{os.getpid()}.npy"
    np.save(tmp, table)
    os.replace(tmp, folder / f"{stem}.npy")
    meta = {"key": key_fields, "stamp": list(index.stamp), "rows": len(index), "stats": stats}
    tmp = folder / f".{stem}.{os.getpid()}.json"
    tmp.write_text(json.dumps(meta, sort_keys=True, default=str))
    os.replace(tmp, folder / f"{stem}.json")
    return folder / f"{stem}.json"


def load_index(cache_dir, name: str, key_fields: dict, path) -> tuple[LineIndex, dict] | None:
    """The cached index of ``path`` under these key fields, or ``None`` (no entry, another file stamp, or an entry
    that does not read back whole). The table is memory-mapped read-only: workers share its pages."""
    folder = Path(cache_dir)
    stem = f"{name}-{cache_key(key_fields)}"
    try:
        meta = json.loads((folder / f"{stem}.json").read_text())
        if meta.get("key") != json.loads(json.dumps(key_fields, sort_keys=True, default=str)):
            return None
        stamp = file_stamp(path)
        if list(stamp) != meta["stamp"]:
            return None
        table = np.load(folder / f"{stem}.npy", mmap_mode="r")
        if table.ndim != 2 or table.shape != (int(meta["rows"]), 3) or table.dtype != np.int64:
            return None
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return LineIndex(path, table[:, 0], table[:, 1], table[:, 2], stamp), meta["stats"]
