"""A run's files, in a local folder or on object storage (``gs://``), through one code path.

Work directories may live on a local disk, a shared mount, or a bucket that every host of a TPU
pod slice reaches. Paths go through :func:`path`: a local one becomes an absolute
``pathlib.Path``, a URL an ``etils.epath.Path`` (TensorFlow's GCS file system, or gcsfs when
``EPATH_USE_TF=false``). Both offer the same methods, so callers do not branch on where a file lives.

What does differ is how a file appears whole. A local file is written beside its destination and
renamed over it. Object storage has no rename, but an object upload is all or nothing: a reader
sees the old object or the new one, never a part. Every writer of the package goes through
:func:`write_bytes`, :func:`move` and :func:`replace_dir`, which do the right thing for each, so
no reader ever sees a half-written file. Files that need local file handles (array_record
writers, PIL) are built in a local :func:`staging` folder first.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path

from etils import epath
from fsspec import config as fsspec_config

# What etils.epath reaches besides local files.
REMOTE_PREFIXES = ("gs://", "s3://", "az://")

# Where epath goes through fsspec (gcsfs and the like, e.g. with EPATH_USE_TF=false), a process
# caches the folder listings it has read; a file that another host wrote after that listing
# would then look missing (the anchor shards of a multi-host run, a checkpoint's step folder).
# Each question goes to the bucket instead.
for _protocol in ("gs", "gcs", "s3", "az"):
    fsspec_config.conf.setdefault(_protocol, {}).setdefault("use_listings_cache", False)

AnyPath = Path | epath.Path


def is_remote(p: str | os.PathLike) -> bool:
    """True for object-storage URLs (``gs://bucket/...``)."""
    return os.fspath(p).startswith(REMOTE_PREFIXES)


def path(p: str | os.PathLike) -> AnyPath:
    """``p`` as a path object: an absolute ``pathlib.Path`` locally, an ``epath.Path`` for a URL."""
    if is_remote(p):
        return epath.Path(os.fspath(p))
    return Path(p).absolute()


def size(p: AnyPath) -> int:
    """Bytes in the file ``p``."""
    if is_remote(p):
        return int(epath.Path(p).stat().length)
    return os.stat(p).st_size


def umask() -> int:
    """The process's file mode creation mask."""
    # Read rather than set-and-restore: os.umask would briefly change it for every thread.
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except OSError:
        pass
    return 0o022


def write_bytes(dst: AnyPath, data: bytes, *, tmp_dir: AnyPath | None = None) -> None:
    """Writes ``dst`` so that a reader (or a crash) sees its old content or the new, never a part.

    Locally the bytes go to a temporary file in ``tmp_dir`` (default: beside ``dst``; it must be on
    the same file system) that is then renamed over ``dst``.
    """
    if is_remote(dst):
        epath.Path(dst).write_bytes(data)  # one upload: the object appears whole or not at all
        return
    dst = Path(dst)
    folder = Path(tmp_dir) if tmp_dir is not None else dst.parent
    folder.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{dst.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~umask())  # mkstemp makes files private; these are meant to be read
        os.replace(tmp, dst)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_text(dst: AnyPath, text: str) -> None:
    """:func:`write_bytes` of UTF-8 text."""
    write_bytes(dst, text.encode("utf-8"))


@contextlib.contextmanager
def staging(parent: AnyPath, prefix: str) -> Iterator[Path]:
    """A fresh local folder to build files in, deleted on exit.

    For a local ``parent`` it is created inside it, on the same file system, so that moving its
    files out is a rename; for a remote one it is in the local temporary directory.
    """
    if is_remote(parent):
        folder = Path(tempfile.mkdtemp(prefix=prefix))
    else:
        Path(parent).mkdir(parents=True, exist_ok=True)
        folder = Path(tempfile.mkdtemp(prefix=prefix, dir=parent))
    try:
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def move(src: Path, dst: AnyPath) -> None:
    """Puts the finished local file ``src`` at ``dst``: a rename locally, an upload (then deleting
    ``src``) to object storage."""
    if is_remote(dst):
        with open(src, "rb") as f:
            epath.Path(dst).write_bytes(f.read())
        Path(src).unlink()
    else:
        os.replace(src, dst)


def replace_dir(src: Path, dst: AnyPath, *, last: str) -> None:
    """Puts the finished local folder ``src`` at ``dst``, replacing any folder there.

    Locally: a rename, with an existing ``dst`` swapped out first and deleted after, so that
    ``dst`` is always either the old folder or the new one. On object storage: the old objects
    are deleted, the new files uploaded, and the top-level file ``last`` uploaded last, so that
    its presence marks a complete folder (readers check for it).
    """
    if is_remote(dst):
        dst = epath.Path(dst)
        if dst.exists():
            dst.rmtree()
        files = sorted(p for p in src.rglob("*") if p.is_file())
        marker = src / last
        for f in [f for f in files if f != marker] + ([marker] if marker.exists() else []):
            target = dst / f.relative_to(src).as_posix()
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(f.read_bytes())
        shutil.rmtree(src, ignore_errors=True)
        return
    dst = Path(dst)
    if not dst.exists():
        os.replace(src, dst)
        return
    old = dst.with_name(f"{dst.name}.old-{uuid.uuid4().hex[:8]}")
    os.replace(dst, old)
    try:
        os.replace(src, dst)
    except OSError:
        os.replace(old, dst)  # put the previous folder back rather than leave none
        raise
    shutil.rmtree(old, ignore_errors=True)
