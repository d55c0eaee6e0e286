"""Files that a reader, or a crash, never sees half written.

    write_atomically(path, text)   # text to a sibling temporary file, fsync, rename over `path`, fsync the directory
"""

import os
from pathlib import Path


def write_synced(path: Path, content: str | bytes) -> None:
    """Write `content` to `path` and fsync it."""
    with open(path, "wb") as file:
        file.write(content.encode() if isinstance(content, str) else content)
        file.flush()
        os.fsync(file.fileno())


def fsync_path(path: Path) -> None:
    """fsync a file, or a directory (its entries: renames, new files)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomically(path: str | Path, text: str) -> None:
    """`path` holds either its old content or all of `text`, also after a crash."""
    path = Path(path)
    partial = path.with_name(path.name + ".partial")
    write_synced(partial, text)
    os.replace(partial, path)
    fsync_path(path.parent)
