"""Run folders on a local disk or an object store (`gs://bucket/run`), through etils.epath.

Every file a run writes into its workdir goes through here or through epath directly (orbax
checkpoints already do), so the same command trains into a bucket that every host of a pod sees.
Object stores have no atomic rename and no append: `write_atomic` writes a temporary object and
renames it (atomic on a local disk, a copy on a bucket); appenders rewrite the whole object.
"""
from __future__ import annotations

import hashlib
import io
import os

from etils import epath


def is_remote(path) -> bool:
    return "://" in str(path)


def path(p) -> epath.Path:
    """An epath.Path: `~` expanded and made absolute on a local disk, as given on a bucket."""
    if is_remote(p):
        return epath.Path(str(p))
    return epath.Path(os.path.abspath(os.path.expanduser(str(p))))


def write_atomic(target, data: str | bytes) -> None:
    target = path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.parent / (target.name + ".tmp")
    tmp.write_bytes(data.encode() if isinstance(data, str) else data)
    tmp.replace(target)


def copy_tree(source, target) -> None:
    """Every file under `source` to the same place under `target` (either may be a bucket)."""
    source, target = path(source), path(target)
    for relative in files_under(source):
        destination = target / relative
        destination.parent.mkdir(parents=True, exist_ok=True)
        (source / relative).copy(destination, overwrite=True)


def files_under(folder) -> list[str]:
    """The relative paths of every file under `folder`, sorted (epath's walk: no `**` globs,
    which object stores refuse)."""
    folder = path(folder)
    return sorted(str((directory / name).relative_to(folder))
                  for directory, _, names in folder.walk() for name in names)


def save_png(target, image) -> None:
    """A PIL image as PNG at `target` (local or remote)."""
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    write_atomic(target, buffer.getvalue())


def local_dir(workdir, what: str) -> str:
    """A local folder for tools that write only to local disks (W&B's run files): the workdir
    itself when it is local, else ~/.cache/lcm_jax/<what>/<name>-<hash of the URL>."""
    if not is_remote(workdir):
        return str(path(workdir))
    name = str(workdir).rstrip("/").rsplit("/", 1)[-1]
    digest = hashlib.sha1(str(workdir).encode()).hexdigest()[:8]
    folder = os.path.join(os.path.expanduser("~/.cache/lcm_jax"), what, f"{name}-{digest}")
    os.makedirs(folder, exist_ok=True)
    return folder


class LineLog:
    """An append-only text file (metrics.jsonl): appended on a local disk; on a bucket, which
    cannot append, the lines so far are kept and the object is rewritten on each flush."""

    def __init__(self, target):
        self.target = path(target)
        self.remote = is_remote(target)
        if self.remote:
            self.text = self.target.read_text() if self.target.exists() else ""
        else:
            self.file = self.target.open("a")

    def write(self, line: str) -> None:
        if self.remote:
            self.text += line
            write_atomic(self.target, self.text)
        else:
            self.file.write(line)
            self.file.flush()

    def close(self) -> None:
        if not self.remote:
            self.file.close()
