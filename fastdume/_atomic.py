"""Write files and directories all at once: build under a temporary sibling name, then rename."""

import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path


def check_writable_directory(path):
    """`path` as a Path if it can receive a new directory; FileExistsError if it holds anything."""
    path = Path(path)
    if path.exists() and (not path.is_dir() or any(path.iterdir())):
        raise FileExistsError(f"output directory {str(path)!r} exists and is not empty")
    return path


@contextlib.contextmanager
def atomic_directory(path):
    """Yield a temporary directory that becomes `path` only if the block succeeds.

    `path` must not exist or be an empty directory, so nothing a user had there is ever
    overwritten or mixed with new files; on failure the temporary directory is removed.
    """
    path = check_writable_directory(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp", dir=path.parent))
    try:
        yield tmp
        if path.exists():
            path.rmdir()
        os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def publish_directory(dest, fill, done="model.safetensors"):
    """Build a cache folder with fill(tmp) in a temporary sibling, then rename it to `dest`.

    For deterministic caches that several processes may build at once: if another process
    published `dest` first (its `done` file exists), theirs is kept and ours discarded.
    """
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=dest.parent, prefix=f".{dest.name}-"))
    try:
        fill(tmp)
        tmp.chmod(0o755)
        try:
            os.replace(tmp, dest)
        except OSError:
            if not (dest / done).exists():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def write_json(path, data, **dump_options):
    """JSON to a temporary name next to `path`, then renamed into place; `dump_options` go to
    json.dump (indent 2 unless given)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, **{"indent": 2, **dump_options})
            f.write("\n")
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise
