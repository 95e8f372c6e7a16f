"""Atomic file writes for the command's outputs (final latents, JSON summaries).

A reader (or a crash) must never see half a file: the data goes to a temporary file in the target's own
directory (same filesystem, so the rename cannot turn into a copy), is flushed to disk, gets the permissions
a plain `open()` would have given it, and replaces the target with `os.replace` (atomic on POSIX and Windows).
On any failure the temporary file is removed and an existing target is left untouched.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Callable


def _default_mode() -> int:
    """0o666 minus the umask (reading the umask means setting it; restored at once)."""
    mask = os.umask(0o022)
    try:
        return 0o666 & ~mask
    finally:
        os.umask(mask)


def atomic_write(path: str | os.PathLike, write: Callable[[str], None]) -> str:
    """Call `write(tmp_path)` to produce the file, then move it to `path` atomically. Returns `path`."""
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=directory)
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, _default_mode())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    return path


def write_text_atomic(path: str | os.PathLike, text: str) -> str:
    def write(tmp: str) -> None:
        with open(tmp, "w") as f:
            f.write(text)

    return atomic_write(path, write)


def write_safetensors_atomic(path: str | os.PathLike, tensors: dict, metadata: dict[str, str] | None = None) -> str:
    """Save `tensors` (moved to the CPU first) as safetensors at `path`, atomically."""
    from safetensors.torch import save_file

    from profiling.syncs import allow_host_sync

    with allow_host_sync("copy the final latents to the host for saving"):
        host = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    return atomic_write(path, lambda tmp: save_file(host, tmp, metadata=metadata))
