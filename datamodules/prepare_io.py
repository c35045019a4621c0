"""Disk helpers of `resnet prepare imagenet`: the MD5 check of the official files, the record of the files already
verified (so that a rerun does not hash the 148 GB train tar again), and fsync."""

from __future__ import annotations

import errno
import hashlib
import json
import os
from pathlib import Path
from typing import Optional

VERIFIED_RECORD = ".prepare_verified.json"  # in dst; a dot name, so never a class or a sample to the loaders


def disk_full(error: Optional[BaseException]) -> Optional[OSError]:
    """The OSError of a full file system or quota (ENOSPC, EDQUOT) that `error` is or was raised over, else None.
    torch reports a write that failed part-way as a RuntimeError (e.g. "unexpected pos") over the OSError."""
    seen = set()
    while isinstance(error, BaseException) and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT):
            return error
        error = error.__cause__ or error.__context__
    return None


class ChecksumError(ValueError):
    """An official ILSVRC2012 file whose MD5 is not the published one: a damaged or incomplete download."""


def verify_md5(path: Path, official: str, published: str) -> None:
    """Compare the MD5 of `path` with the published one of the file named `official`, printing the progress.

    Args:
        path: the file to hash.
        official: the official file's name, quoted in the error.
        published: its published MD5 (hex).

    Raises:
        ChecksumError: the digests differ.
    """
    size, done, shown = path.stat().st_size, 0, 0
    total = f"{size / 1e9:,.1f} GB" if size >= 10**8 else f"{size / 1e6:,.1f} MB"
    digest = hashlib.md5(usedforsecurity=False)
    with open(path, "rb") as f:
        while chunk := f.read(1 << 24):
            digest.update(chunk)
            done += len(chunk)
            if done * 20 // max(size, 1) > shown:  # every 5%: ILSVRC2012_img_train.tar is 147.9 GB
                shown = done * 20 // max(size, 1)
                print(f"{path}: checking MD5, {shown * 5}% of {total}", flush=True)
    if digest.hexdigest() != published:
        raise ChecksumError(
            f"{path}: MD5 {digest.hexdigest()}, the published {official} has {published}: the file is damaged "
            "or incomplete. Download it again, or pass --verify_checksums false to use it as it is"
        )


class VerifiedRecord:
    """The official files whose MD5 matched, by name: resolved path, size, mtime_ns and the digest they matched, kept
    in dst/.prepare_verified.json. A rerun, or the resume of a stopped run, does not hash the same file again; a
    file with another size or mtime (a new download, a copy, a `touch`) is hashed again. Deleting the record forces
    every file to be hashed again.

    Args:
        root: dst, the folder that holds (or will hold) the record. Nothing is written before `save`.
    """

    def __init__(self, root: Path) -> None:
        self.path = root / VERIFIED_RECORD
        self.files = self._read()
        self._changed = False

    def _read(self) -> dict[str, dict]:
        try:
            files = json.loads(self.path.read_text())
        except (OSError, ValueError):  # none yet, or damaged by hand (it is written atomically): hash them again
            return {}
        return files if isinstance(files, dict) else {}

    def verify(self, path: Path, official: str, published: str) -> None:
        """`verify_md5`, or a line saying that the same file was verified before.

        Raises:
            ChecksumError: the file was hashed, and its MD5 is not `published`.
        """
        # The identity is taken before hashing: a file changed during the hashing differs from it next time.
        stat = path.stat()
        identity = {"path": str(path.resolve()), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "md5": published}
        if self.files.get(official) == identity:
            print(f"{path}: MD5 verified before ({self.path})", flush=True)
            return
        verify_md5(path, official, published)
        self.files[official] = identity
        self._changed = True

    def save(self) -> None:
        """Write the record if a file was hashed: creates dst, so only once every check has passed."""
        if self._changed:
            write_atomic(self.path, (json.dumps(self.files, indent=1, sort_keys=True) + "\n").encode())
            self._changed = False


def write_atomic(path: Path, data: bytes) -> None:
    """Write `path` under a temporary name, sync it and rename it: a reader sees the old file or the whole new one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    part = path.with_name(path.name + ".part")
    with open(part, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(part, path)
    fsync_path(path.parent)


def fsync_path(path: Path) -> None:
    """Push a file's data, or a folder's entries, to the disk. Before a rename, so that the final name never shows a
    file a crash left empty; after renames, so that they last (one lost in a crash is copied again by the next run).

    Raises:
        OSError: the sync failed (a folder that the file system cannot sync is skipped: its files are synced).
    """
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError as e:  # some network and FUSE file systems cannot sync a folder; its files are synced
        if not (e.errno == errno.EINVAL and path.is_dir()):
            raise
    finally:
        os.close(fd)
