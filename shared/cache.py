"""The feature cache: where stage 1 writes hidden states and stages 2 and 3 read them.

Layout of `cache/features/NAME/`:

    index.json                 fingerprint (backbone, taps, dtype, features, manifests, code version)
                               and the plan: every table's item count and shard size
    glossary.json              the normalised glossary (term keys in id order, aliases, texts)
    chunk_texts.json           distinct chunk texts, in the order of table text/chunks
    top_audio.{safetensors,json}, top_text.{...}   the exported trainable top layers
    tables/<table>/<k>.zarr|.h5        one shard: `frames` (F, D) float16 + `offsets` (n + 1)
    tables/<table>/<k>.done.json       written last: ids, frame count, sha256; a shard without it
                                       does not exist for readers and is redone by writers

Tables: `audio/<split>` (one item per chunk, per-frame states at the audio tap),
`text/glossary` (one item per term id), `text/chunks` (one item per distinct chunk text).
Ragged items are stored as one 2-D array of frames plus offsets, uncompressed: float16 hidden
states barely compress (5-13%) while compression costs 2-10x in read speed (see NOTES).
A shard is written under a temporary name, renamed, then marked done, so a killed writer never
leaves something a later run would take for finished.
"""
from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import socket
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from shared.atomic import write_json_atomic
from shared.config import diff_configs
from shared.errors import BadInput

CACHE_VERSION = 1
FORMATS = ("zarr", "hdf5")


# ---------------------------------------------------------------- storage backends (one shard)

def _shard_suffix(fmt: str) -> str:
    return {"zarr": ".zarr", "hdf5": ".h5"}[fmt]


def write_shard_file(path: Path, frames: np.ndarray, offsets: np.ndarray, fmt: str) -> None:
    if fmt == "zarr":
        import zarr
        g = zarr.open_group(str(path), mode="w")
        rows = max(1, min(len(frames), 8192))
        a = g.create_array("frames", shape=frames.shape, dtype=frames.dtype,
                           chunks=(rows, frames.shape[1]), compressors=None)
        if len(frames):
            a[:] = frames
        o = g.create_array("offsets", shape=offsets.shape, dtype="int64", chunks=offsets.shape,
                           compressors=None)
        o[:] = offsets
    elif fmt == "hdf5":
        import h5py
        with h5py.File(path, "w") as f:
            # contiguous (no chunking, no filters): one pread per item
            f.create_dataset("frames", data=frames)
            f.create_dataset("offsets", data=offsets)
    else:
        raise BadInput(f"unknown cache format {fmt!r}", fix="set cache.format to zarr or hdf5")


class ShardReader:
    """Random access to one shard's items; `frames_all()` reads the shard in one go."""

    def __init__(self, path: Path, fmt: str):
        self.path, self.fmt = path, fmt
        self._raw = None       # zarr with raw little-endian chunks: (rows per chunk, dtype, width, fill)
        if fmt == "zarr":
            import zarr
            g = zarr.open_group(str(path), mode="r")
            self._frames = g["frames"]
            self.offsets = np.asarray(g["offsets"][:])
            meta = json.loads((path / "frames" / "zarr.json").read_text())
            if meta["codecs"] == [{"name": "bytes", "configuration": {"endian": "little"}}] and \
                    meta["chunk_key_encoding"] == {"name": "default", "configuration": {"separator": "/"}} and \
                    len(meta["shape"]) == 2:
                self._raw = (meta["chunk_grid"]["configuration"]["chunk_shape"][0],
                             np.dtype(meta["data_type"]).newbyteorder("<"), meta["shape"][1], meta["fill_value"])
        else:
            import h5py
            self._file = h5py.File(path, "r")
            self._frames = self._file["frames"]
            self.offsets = self._file["offsets"][:]

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def item(self, i: int) -> np.ndarray:
        a, b = int(self.offsets[i]), int(self.offsets[i + 1])
        if self._raw is not None:      # the item's rows straight from the chunk file(s): zarr reads whole chunks
            rows, dtype, width, _ = self._raw
            out = np.empty((b - a, width), dtype=dtype)
            self._read_rows(a, out)
            return out
        return np.asarray(self._frames[a:b])

    def _read_rows(self, start: int, out: np.ndarray) -> None:
        """Rows start .. start + len(out) of a raw-chunk zarr array into `out`."""
        rows, dtype, width, fill = self._raw
        row_bytes = width * dtype.itemsize
        done = 0
        while done < len(out):
            r = start + done
            c, within = divmod(r, rows)
            n = min(len(out) - done, rows - within)
            part = out[done:done + n]
            chunk = self.path / "frames" / "c" / str(c) / "0"
            if not chunk.exists():             # zarr leaves chunks that hold only the fill value unwritten
                part[...] = fill
            else:
                with open(chunk, "rb") as f:   # an edge chunk is stored whole: read only the rows asked for
                    f.seek(within * row_bytes)
                    if f.readinto(memoryview(part).cast("B")) != part.nbytes:
                        raise OSError(f"{chunk}: shorter than the rows its array metadata promises")
            done += n

    def frames_all(self) -> np.ndarray:
        return np.asarray(self._frames[:])

    def read_into(self, out: np.ndarray) -> None:
        """The shard's frames straight into `out` (a slice of a preallocated array): HDF5 with
        `read_direct`; zarr, when its chunks are raw little-endian bytes (how `write_shard` stores them),
        by reading each chunk file into place, since zarr-python 3 decodes through its asyncio machinery
        at about a quarter of the disk's speed (measured by `make bench`); through zarr otherwise."""
        if not len(out):
            return
        if self.fmt == "hdf5":
            self._frames.read_direct(out)
        elif self._raw is not None and out.dtype == self._raw[1] and out.shape[1] == self._raw[2] \
                and out.flags.c_contiguous:
            self._read_rows(0, out)
        else:
            out[...] = self._frames[:]

    def close(self) -> None:
        if self.fmt == "hdf5":
            self._file.close()


def shard_checksum(frames: np.ndarray, offsets: np.ndarray) -> str:
    h = hashlib.sha256()
    h.update(np.ascontiguousarray(offsets, dtype=np.int64).tobytes())
    h.update(np.ascontiguousarray(frames).tobytes())
    return h.hexdigest()


def _write_json_atomic(path: Path, data) -> None:
    write_json_atomic(path, data, indent=1)


def file_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


# ---------------------------------------------------------------- tables


@dataclass
class TablePlan:
    items: int
    shard_size: int

    @property
    def shards(self) -> int:
        return (self.items + self.shard_size - 1) // self.shard_size

    def bounds(self, k: int) -> tuple[int, int]:
        return k * self.shard_size, min(self.items, (k + 1) * self.shard_size)


class Table:
    """One ragged table of the cache (e.g. `audio/train`): its shards, writer and reader sides."""

    def __init__(self, cache: "FeatureCache", name: str, plan: TablePlan):
        self.cache, self.name, self.plan = cache, name, plan
        self.dir = cache.root / "tables" / name
        self._readers: dict[int, ShardReader] = {}
        self._meta: list[dict] | None = None

    # -- writer side
    def shard_path(self, k: int) -> Path:
        return self.dir / f"{k:05d}{_shard_suffix(self.cache.format)}"

    def done_path(self, k: int) -> Path:
        return self.dir / f"{k:05d}.done.json"

    def is_done(self, k: int) -> bool:
        # a done mark whose shard vanished (deleted, lost on disk) is not done: extract redoes it
        return self.done_path(k).is_file() and self.shard_path(k).exists()

    def write_shard(self, k: int, ids: list[str], items: list[np.ndarray], rejected: list[dict] = ()) -> dict:
        """Commit shard k: write to a temporary name, rename, then mark done (in that order)."""
        self.dir.mkdir(parents=True, exist_ok=True)
        dim = self.cache.dim_of(self.name)
        frames = (np.concatenate(items).astype(self.cache.dtype) if items
                  else np.zeros((0, dim), dtype=self.cache.dtype))
        offsets = np.zeros(len(items) + 1, dtype=np.int64)
        offsets[1:] = np.cumsum([len(x) for x in items])
        final = self.shard_path(k)
        tmp = final.with_name(f".{final.name}.tmp-{socket.gethostname()}-{os.getpid()}")
        _remove(tmp)
        write_shard_file(tmp, frames, offsets, self.cache.format)
        _remove(final)  # a shard without its done mark is an unfinished leftover
        os.replace(tmp, final)
        meta = {"ids": list(ids), "frames": int(len(frames)), "dim": int(frames.shape[1]),
                "sha256": shard_checksum(frames, offsets), "rejected": list(rejected),
                "bytes": int(frames.nbytes)}
        _write_json_atomic(self.done_path(k), meta)
        return meta

    def clean_leftovers(self) -> int:
        """Remove temporary and unmarked shards from killed writers; return how many."""
        if not self.dir.is_dir():
            return 0
        n = 0
        suffix = _shard_suffix(self.cache.format)
        for p in self.dir.iterdir():
            if p.name.startswith(".") and ".tmp-" in p.name:
                _remove(p)
                n += 1
            elif p.name.endswith(suffix) and not self.done_path(int(p.name[:5])).exists():
                _remove(p)
                n += 1
        return n

    # -- reader side
    def meta(self) -> list[dict]:
        if self._meta is None:
            metas = []
            for k in range(self.plan.shards):
                p = self.done_path(k)
                if not p.is_file():
                    raise BadInput(f"cache incomplete: table {self.name} shard {k} is missing",
                                   file=self.cache.root,
                                   fix="rerun `python -m stage1_extract extract` to finish it")
                metas.append(json.loads(p.read_text(encoding="utf-8")))
            self._meta = metas
            self._starts = np.cumsum([0] + [len(m["ids"]) for m in metas])
        return self._meta

    def reader(self, k: int) -> ShardReader:
        if k not in self._readers:
            self._readers[k] = ShardReader(self.shard_path(k), self.cache.format)
        return self._readers[k]

    @property
    def ids(self) -> list[str]:
        return [i for m in self.meta() for i in m["ids"]]

    def rejected(self) -> list[dict]:
        return [r for m in self.meta() for r in m.get("rejected", [])]

    def lengths(self) -> np.ndarray:
        return np.concatenate([np.diff(self.reader(k).offsets) for k in range(self.plan.shards)] or
                              [np.zeros(0, np.int64)])

    def __len__(self) -> int:
        return sum(len(m["ids"]) for m in self.meta())

    def item(self, i: int) -> np.ndarray:
        self.meta()
        k = int(np.searchsorted(self._starts, i, side="right") - 1)
        return self.reader(k).item(i - int(self._starts[k]))

    def load(self) -> tuple[np.ndarray, np.ndarray]:
        """All frames in memory (F, D) and offsets (n + 1): what training uses when it fits."""
        # one read per shard into one preallocated array: no per-shard arrays to concatenate (which
        # doubled the memory traffic and the peak)
        readers = [self.reader(k) for k in range(self.plan.shards)]
        sizes = [int(r.offsets[-1]) for r in readers]
        frames = np.empty((sum(sizes), self.cache.dim_of(self.name)), dtype=self.cache.dtype)
        offsets, base = [np.zeros(1, np.int64)], 0
        for r, n in zip(readers, sizes):
            r.read_into(frames[base:base + n])
            offsets.append(r.offsets[1:] + base)
            base += n
        return frames, np.concatenate(offsets)

    def nbytes(self) -> int:
        return sum(m.get("bytes", 0) for m in self.meta())

    def verify(self) -> list[str]:
        """Names of shards that are missing or whose content no longer matches its checksum."""
        bad = []
        for k in range(self.plan.shards):
            if not self.is_done(k) or not self.shard_path(k).exists():
                bad.append(f"{self.name}/{k:05d}: missing")
                continue
            meta = json.loads(self.done_path(k).read_text())
            try:
                r = ShardReader(self.shard_path(k), self.cache.format)
                ok = shard_checksum(r.frames_all(), r.offsets) == meta["sha256"]
                r.close()
            except Exception as e:  # an unreadable shard is as bad as a wrong one
                bad.append(f"{self.name}/{k:05d}: unreadable ({type(e).__name__})")
                continue
            if not ok:
                bad.append(f"{self.name}/{k:05d}: checksum mismatch")
        return bad

    def close(self) -> None:
        for r in self._readers.values():
            r.close()
        self._readers.clear()


def _remove(p: Path) -> None:
    if p.is_dir():
        shutil.rmtree(p, ignore_errors=True)
    elif p.exists():
        p.unlink()


# ---------------------------------------------------------------- the cache


class FeatureCache:
    """Open an existing cache for reading (`FeatureCache(path)`) or create one (`FeatureCache.create`)."""

    def __init__(self, root: str | Path):
        self.root = Path(root)
        idx = self.root / "index.json"
        if not idx.is_file():
            raise BadInput("no feature cache here (index.json missing)", file=self.root,
                           fix="run `python -m stage1_extract extract` first, or check cache.name / --features")
        self.index = json.loads(idx.read_text(encoding="utf-8"))
        self.format = self.index["format"]
        self.dtype = np.dtype(self.index["dtype"])
        self.fingerprint = self.index["fingerprint"]
        self.tables = {name: Table(self, name, TablePlan(**p)) for name, p in self.index["tables"].items()}

    @classmethod
    def create(cls, root: str | Path, *, fingerprint: dict, tables: dict[str, TablePlan], dims: dict,
               fmt: str = "zarr", dtype: str = "float16", extra: dict | None = None) -> "FeatureCache":
        """Create the index, or reopen an existing cache if (and only if) its fingerprint matches."""
        if fmt not in FORMATS:
            raise BadInput(f"unknown cache format {fmt!r}", fix="set cache.format to zarr or hdf5")
        root = Path(root)
        idx = root / "index.json"
        fingerprint = json.loads(json.dumps({**fingerprint, "cache_version": CACHE_VERSION,
                                             "dtype": dtype, "format": fmt}))
        if idx.is_file():
            old = json.loads(idx.read_text(encoding="utf-8"))
            diff = fingerprint_diff(old["fingerprint"], fingerprint)
            if diff and not any((root / "tables" / "audio").glob("*/*.done.json")):
                # no audio shard was finished under the old settings (e.g. a first run that stopped on
                # bad audio): little to lose (text is cheap) and nothing to mix, so start afresh
                shutil.rmtree(root / "tables", ignore_errors=True)
                for name in ("index.json", "glossary.json", "chunk_texts.json"):
                    (root / name).unlink(missing_ok=True)
                for p in root.glob("top_*"):
                    p.unlink()
            elif diff:
                raise BadInput("this cache was built with different settings: " + "; ".join(diff),
                               file=root, fix="use another cache.name, or --force to move the old cache "
                                              "aside and start a fresh one (caches are never mixed)")
            else:
                return cls(root)
        root.mkdir(parents=True, exist_ok=True)
        _write_json_atomic(idx, {"fingerprint": fingerprint, "format": fmt, "dtype": dtype,
                                 "tables": {n: {"items": p.items, "shard_size": p.shard_size}
                                            for n, p in tables.items()},
                                 "dims": dims, "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
                                 **(extra or {})})
        return cls(root)

    def dim_of(self, table: str) -> int:
        return int(self.index["dims"][table.split("/")[0]])

    def table(self, name: str) -> Table:
        if name not in self.tables:
            raise BadInput(f"the cache has no table {name!r} (it has: {', '.join(self.tables)})",
                           file=self.root, fix="extract that split, or choose another")
        return self.tables[name]

    def status(self) -> dict[str, tuple[int, int]]:
        return {n: (sum(t.is_done(k) for k in range(t.plan.shards)), t.plan.shards)
                for n, t in self.tables.items()}

    def complete(self) -> bool:
        return all(d == n for d, n in self.status().values())

    def verify(self) -> list[str]:
        bad = []
        for t in self.tables.values():
            bad += t.verify()
        return bad

    def read_json(self, name: str):
        p = self.root / name
        if not p.is_file():
            raise BadInput(f"{name} missing from the cache", file=self.root, fix="rerun extract")
        return json.loads(p.read_text(encoding="utf-8"))

    def write_json(self, name: str, data) -> None:
        _write_json_atomic(self.root / name, data)

    def close(self) -> None:
        for t in self.tables.values():
            t.close()


def fingerprint_diff(old: dict, new: dict) -> list[str]:
    """What differs between a cache's fingerprint and the one the config gives, one line per key."""
    return [f"{k}: cache has {_short(a)}, config gives {_short(b)}" for k, (a, b) in diff_configs(old, new).items()]


def _short(v) -> str:
    s = json.dumps(v)
    return s if len(s) <= 60 else s[:57] + "..."


# ---------------------------------------------------------------- writer lock


class WriterLock:
    """One writer per lock file, across processes started at the same instant.

    The lock is a kernel `flock` on the file, which the kernel drops when its holder dies however it
    dies, so a crashed writer never blocks the next one and no process has to judge whether another
    is alive. The file holds its owner (host, pid, since), written once the lock is held, for the
    error message and for `live_locks`. A lock file naming another host is respected: flock may not
    reach across hosts on shared storage, and that host's processes cannot be seen from here.

    Why not an O_EXCL lock file with a staleness check (the first design): a writer that found the
    file empty (created, owner not yet written) or owned by a dead pid deleted it and made its own,
    while another writer that had read the same thing deleted *that* one: two writers of one shard
    (tests/test_lock_race.py).
    """

    RETRY_SECONDS = 0.25   # rides out a `live_locks` probe of this file (microseconds) before refusing

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self._fd: int | None = None

    def __enter__(self):
        self.path.parent.mkdir(parents=True, exist_ok=True)
        deadline = time.monotonic() + self.RETRY_SECONDS
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                if time.monotonic() < deadline:
                    time.sleep(0.01)
                    continue
                self._refuse(_read_owner(self.path))
            # the holder before us may have released (unlinked) the file between our open and flock:
            # then we hold a lock on a name nobody else will open; start again on the current file
            try:
                current = os.stat(self.path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                current = False
            if not current:
                os.close(fd)
                continue
            owner = _owner(os.pread(fd, 4096, 0))
            if owner and owner.get("host") != socket.gethostname():
                os.close(fd)
                self._refuse(owner)
            me = {"host": socket.gethostname(), "pid": os.getpid(), "since": time.strftime("%Y-%m-%dT%H:%M:%S")}
            os.ftruncate(fd, 0)
            os.pwrite(fd, json.dumps(me).encode(), 0)
            self._fd = fd
            return self

    def _refuse(self, owner: dict):
        raise BadInput(f"another extraction is writing here (host {owner.get('host')}, pid "
                       f"{owner.get('pid')}, since {owner.get('since')})", file=self.path,
                       fix="wait for it to finish, or delete the lock file if that process is gone")

    def __exit__(self, *exc):
        # unlink while still holding the lock: whoever opened this file meanwhile sees it is gone
        self.path.unlink(missing_ok=True)
        os.close(self._fd)
        self._fd = None


def _owner(raw: bytes) -> dict:
    try:
        owner = json.loads(raw.decode("utf-8", "replace")) if raw.strip() else {}
    except json.JSONDecodeError:
        return {}
    return owner if isinstance(owner, dict) else {}


def _read_owner(path: Path) -> dict:
    try:
        return _owner(path.read_bytes()[:4096])
    except OSError:
        return {}


def _held(path: Path) -> bool:
    """Whether a live process holds the flock of `path` (a shared probe: it never blocks a writer
    for longer than WriterLock.RETRY_SECONDS rides out)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        return False
    except BlockingIOError:
        return True
    finally:
        os.close(fd)


def live_locks(folder: str | Path) -> dict[Path, dict]:
    """The lock files in `folder` held by a live writer (or naming another host): {path: owner}."""
    out = {}
    for p in sorted(Path(folder).glob("*.lock")):
        owner = _read_owner(p)
        if _held(p) or (owner and owner.get("host") != socket.gethostname()):
            out[p] = owner
    return out
