"""Write files and directories all at once: build under a temporary sibling name, then rename."""

import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path

# mkstemp creates files readable by the owner only; published files get the usual permissions.
_UMASK = os.umask(0)
os.umask(_UMASK)


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


@contextlib.contextmanager
def atomic_file(path):
    """Yield a temporary path next to `path` that becomes `path` only if the block succeeds
    (same suffix, for writers that infer the format from it)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=path.suffix, dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        os.chmod(tmp, 0o666 & ~_UMASK)  # after the block: some writers recreate the file
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def save_safetensors(path, tensors, metadata=None):
    """safetensors.torch.save_file, written to a temporary name and renamed into place."""
    from safetensors.torch import save_file

    with atomic_file(path) as tmp:
        save_file(tensors, tmp, metadata=metadata)
    return path


def replace_directory(dest, fill):
    """Build a directory with fill(tmp) in a temporary sibling, then put it in place of `dest`
    (whose old contents are dropped: for outputs a run owns, like its saved model)."""
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=dest.parent, prefix=f".{dest.name}-"))
    try:
        fill(tmp)
        tmp.chmod(0o755)  # mkdtemp makes it private
        shutil.rmtree(dest, ignore_errors=True)
        os.replace(tmp, dest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return dest


def write_json(path, data, **dump_options):
    """JSON to a temporary name next to `path`, then renamed into place; `dump_options` go to
    json.dump (indent 2 unless given)."""
    with atomic_file(path) as tmp, open(tmp, "w") as f:
        json.dump(data, f, **{"indent": 2, **dump_options})
        f.write("\n")
    return path
