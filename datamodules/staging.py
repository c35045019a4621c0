"""Node-local copies of what a run reads (`data.stage_dir`): on clusters the shared file system is the bottleneck of
ImageNet training (1.28 M small reads an epoch from every node), so each node copies the data once to its own disk
(NVMe scratch, $TMPDIR, /local) and the run reads that copy.

What is copied: with `backend ffcv` the .beton files the stage reads; with the folder backends (torchvision, DALI)
the usable images of `train/` and `val/` (from the manifest of `resnet prepare check` when there is one, which is
then carried over to the copy, else from a listing that skips hidden files). Each file is hashed (SHA-256) as it is
read; the copy is complete once its record (`.resnet-stage.json`: the source's key, each file's size and the
combined digest) is written, last and atomically. A copy is reused, by a requeued job or a later one, when its
record matches the source (the same folder times or .beton sizes and times) and a fresh hash of the copy matches
the record; anything else (a copy cut short, a damaged file, a changed source) is copied again.

Once per node: Lightning calls `prepare_data` on each node's local rank 0 (`prepare_data_per_node`), which copies
or checks; the other ranks wait at Lightning's barrier after it, which the process group's timeout bounds
(`trainer.strategy` timeout, 30 min by default: raise it for copies that take longer). A lock in the stage folder
keeps two processes (two jobs on one node) from copying at once; waiting for it is bounded too."""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import logging
import os
import shutil
import socket
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Sequence

from datamodules.folder import DatasetLayoutError, find_classes, scan_split
from datamodules.manifest import NAME as MANIFEST_NAME, Manifest, find_manifest, folder_key
from datamodules.prepare_io import write_atomic

log = logging.getLogger(__name__)

FORMAT = "resnet-stage/1"
RECORD = ".resnet-stage.json"
CHUNK = 8 << 20  # bytes per read: large sequential reads suit shared file systems
THREADS = 16  # files copied at once: a shared file system serves parallel reads far faster than one stream


class StagingError(RuntimeError):
    """A node-local copy that cannot be made (no space, an unwritable folder, a source file gone)."""


def node_name() -> str:
    return os.environ.get("SLURMD_NODENAME") or socket.gethostname()


def stage_root(stage_dir: str, source: Path, kind: str) -> Path:
    """The folder of `source`'s copy under `stage_dir` (environment variables expanded on each node, e.g.
    `$TMPDIR/imagenet`): named by the source's real path, so that two data sets never share one.

    Raises:
        StagingError: a variable in `stage_dir` is not set.
    """
    expanded = os.path.expanduser(os.path.expandvars(stage_dir))
    if "$" in expanded:
        raise StagingError(f"data.stage_dir={stage_dir}: {expanded!r} still holds an unset variable on {node_name()}")
    digest = hashlib.sha256(str(Path(source).resolve()).encode()).hexdigest()[:10]
    return Path(expanded) / f"{Path(source).resolve().name}-{kind}-{digest}"


class Plan:
    """What to copy from `source` to `dest`: `key` identifies the source's state (a copy with another key is stale);
    `listing()` gives the files (relative to `source`) and, for folders, the manifest carried over to the copy. It is
    listed only when copying or checking: the listing is the slow part."""

    def __init__(self, source: Path, dest: Path, key: dict, lister: Callable[[], tuple[list[str], Optional[Manifest]]]):
        self.source, self.dest, self.key, self._lister = Path(source), Path(dest), key, lister
        self._listed: Optional[tuple[list[str], Optional[Manifest]]] = None

    def listing(self) -> tuple[list[str], Optional[Manifest]]:
        if self._listed is None:
            self._listed = self._lister()
        return self._listed


def folder_plan(root: Path, dest: Path, manifest: Optional[str] = None) -> Plan:
    """The usable images of `root`'s train/ and val/ (those present)."""
    splits = [s for s in ("train", "val") if (root / s).is_dir()]
    if not splits:
        raise DatasetLayoutError(f"{root}: neither train/ nor val/ to stage")

    def lister() -> tuple[list[str], Optional[Manifest]]:
        found = find_manifest(root, manifest)
        if found is not None:
            return [f"{s}/{row[0]}" for s in splits for row in found.files.get(s, [])], found
        # a listing, hidden files and folders skipped as everywhere (datamodules/folder.py)
        index = {c: i for i, c in enumerate(find_classes(root / splits[0]))}
        return [os.path.relpath(p, root) for s in splits for p, _ in scan_split(root / s, index)], None

    return Plan(root, dest, {"kind": "folders", "folders": folder_key(root), "splits": splits}, lister)


def beton_plan(ffcv_dir: Path, dest: Path, splits: Sequence[str]) -> Plan:
    """The .beton files of `splits` in `ffcv_dir`."""
    names = [f"{s}.beton" for s in splits]
    missing = [n for n in names if not (ffcv_dir / n).is_file()]
    if missing:
        raise DatasetLayoutError(f"{ffcv_dir}: no {', '.join(missing)} to stage (write them with `resnet prepare ffcv`)")
    stats = {n: (ffcv_dir / n).stat() for n in names}
    key = {"kind": "ffcv", "files": {n: [s.st_size, s.st_mtime_ns] for n, s in stats.items()}}
    return Plan(ffcv_dir, dest, key, lambda: (names, None))


@dataclass
class Staged:
    root: Path
    files: int
    bytes: int
    copied: bool  # False: a valid copy was reused
    seconds: float


def read_record(dest: Path) -> Optional[dict]:
    try:
        record = json.loads((dest / RECORD).read_text())
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) and record.get("format") == FORMAT else None


def _hash_file(path: Path, out: Optional[Path] = None) -> tuple[int, str]:
    """(size, sha256) of `path`, written to `out` on the way when given (under a temporary name, then renamed)."""
    digest, size = hashlib.sha256(), 0
    part = out.with_name(out.name + ".part") if out is not None else None
    with open(path, "rb") as src, (open(part, "wb") if part is not None else open(os.devnull, "wb")) as dst:
        while chunk := src.read(CHUNK):
            digest.update(chunk)
            size += len(chunk)
            if part is not None:
                dst.write(chunk)
    if part is not None:
        os.replace(part, out)
    return size, digest.hexdigest()


def _combined(names: list[str], results: list[tuple[int, str]]) -> str:
    whole = hashlib.sha256()
    for name, (size, digest) in zip(names, results):
        whole.update(f"{name}\0{size}\0{digest}\n".encode())
    return whole.hexdigest()


def _hash_all(names: list[str], base: Path, out: Optional[Path], threads: int) -> list[tuple[int, str]]:
    if out is not None:
        for folder in sorted({os.path.dirname(n) for n in names}):
            (out / folder).mkdir(parents=True, exist_ok=True)
    pool = ThreadPoolExecutor(threads)
    try:
        return list(pool.map(lambda n: _hash_file(base / n, out / n if out is not None else None), names))
    finally:  # on an error or a job signal, the files not yet started are dropped, not copied first
        pool.shutdown(wait=True, cancel_futures=True)


def _check(plan: Plan, record: dict, threads: int) -> Optional[str]:
    """Why the copy at plan.dest is not valid, or None when it is (sizes, then a fresh hash of every file)."""
    if record.get("key") != plan.key:
        return f"its source {plan.source} changed since the copy"
    names, sizes = record["files"], record["sizes"]
    for name, size in zip(names, sizes):
        try:
            if (plan.dest / name).stat().st_size != size:
                return f"{plan.dest / name}: {(plan.dest / name).stat().st_size} bytes, {size} copied"
        except FileNotFoundError:
            return f"{plan.dest / name}: missing"
    if _combined(names, _hash_all(names, plan.dest, None, threads)) != record["sha256"]:
        return "a file's SHA-256 differs from the copy's record (damaged since)"
    return None


def _copy(plan: Plan, threads: int) -> tuple[int, int]:
    names, manifest = plan.listing()
    if manifest is not None:  # sizes known: refuse a copy that cannot fit before writing anything
        need = sum(row[2] for s in plan.key["splits"] for row in manifest.files.get(s, []))
        plan.dest.parent.mkdir(parents=True, exist_ok=True)
        free = shutil.disk_usage(plan.dest.parent).free
        if need > free:
            raise StagingError(f"data.stage_dir: {plan.dest.parent} on {node_name()} has {free / 1e9:.1f} GB free, "
                               f"the copy of {plan.source} needs {need / 1e9:.1f} GB")
    try:
        results = _hash_all(names, plan.source, plan.dest, threads)
    except OSError as e:
        if e.errno == errno.ENOSPC:
            raise StagingError(f"data.stage_dir: {plan.dest} on {node_name()} is full ({e.filename}); the copy of "
                               f"{plan.source} does not fit") from e
        raise StagingError(f"staging {plan.source} to {plan.dest} on {node_name()}: {e}") from e
    if manifest is not None:  # the checked lists carried over: no rank lists the copy either
        m = manifest
        Manifest(plan.dest, folder_key(plan.dest), m.classes, m.files, m.bad, m.refused).write(plan.dest / MANIFEST_NAME)
    os.sync()  # the record, written last, must not outlive the data after a crash of the node
    write_atomic(plan.dest / RECORD, json.dumps({
        "format": FORMAT, "source": str(plan.source.resolve()), "key": plan.key, "files": names,
        "sizes": [size for size, _ in results], "sha256": _combined(names, results),
    }).encode())
    return len(names), sum(size for size, _ in results)


class _Lock:
    """An exclusive lock on `path` (released by the kernel when its holder dies), waited for at most `timeout` s."""

    def __init__(self, path: Path, timeout: float):
        self.path, self.timeout = path, timeout

    def __enter__(self):
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        end = time.monotonic() + self.timeout
        while True:
            try:
                fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > end:
                    holder = os.pread(self.fd, 64, 0).decode(errors="replace").strip()
                    os.close(self.fd)
                    raise StagingError(f"{self.path}: still locked after {self.timeout:.0f} s by another copy "
                                       f"({holder or 'unknown process'}) on {node_name()}") from None
                time.sleep(0.5)
        os.ftruncate(self.fd, 0)
        os.pwrite(self.fd, f"pid {os.getpid()} on {node_name()}".encode(), 0)
        return self

    def __exit__(self, *exc):
        os.close(self.fd)  # the lock goes with the descriptor


def stage(plan: Plan, check: bool = True, threads: int = THREADS, wait_s: float = 6 * 3600) -> Staged:
    """Make or reuse the copy at plan.dest. `check=False` (a rank after its node's local rank 0 made or checked the
    copy in this run) trusts a complete record with the source's key and hashes nothing.

    Raises:
        StagingError: no space, an unwritable stage folder, an unreadable source file, or the lock held by another
            copy for `wait_s` seconds.
    """
    start = time.monotonic()
    try:
        plan.dest.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise StagingError(f"data.stage_dir: cannot use {plan.dest.parent} on {node_name()} "
                           f"({e.strerror or e}): give a writable node-local folder") from e
    record = read_record(plan.dest)
    if not check and record is not None and record.get("key") == plan.key:
        return Staged(plan.dest, len(record["files"]), sum(record["sizes"]), False, 0.0)
    with _Lock(plan.dest.parent / f".{plan.dest.name}.lock", wait_s):
        record = read_record(plan.dest)  # another process may have finished it while this one waited
        why = _check(plan, record, threads) if record is not None else "no complete copy"
        if why is None:
            return Staged(plan.dest, len(record["files"]), sum(record["sizes"]), False, time.monotonic() - start)
        if plan.dest.exists():
            log.warning("staged copy %s on %s not used (%s): copying %s again", plan.dest, node_name(), why, plan.source)
            shutil.rmtree(plan.dest)
        try:
            count, size = _copy(plan, threads)
        except BaseException:  # a copy cut short leaves nothing that looks usable (a job signal included)
            shutil.rmtree(plan.dest, ignore_errors=True)
            raise
    return Staged(plan.dest, count, size, True, time.monotonic() - start)


def describe(staged: Staged, plan: Plan) -> str:
    how = "copied" if staged.copied else "reused (SHA-256 checked)"
    return (f"Staged {plan.source} on {node_name()}: {staged.files} files ({staged.bytes / 1e6:.1f} MB) {how} in "
            f"{staged.root} in {staged.seconds:.1f} s")


__all__ = ["StagingError", "stage_root", "folder_plan", "beton_plan", "stage", "describe", "read_record"]
