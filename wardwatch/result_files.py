"""Result files of the long commands (demo --summary-json, soak --json, bench --json).

Checked before the run, so a path that cannot be written fails in a second, not after minutes of work; and
replaced atomically (a temp file in the same directory, then rename), so a command killed while writing never
leaves a truncated JSON file that a CI job or a README table would read as a complete result.
"""

from __future__ import annotations

import os
import tempfile
import uuid
from pathlib import Path


def check_writable(path: Path) -> None:
    """Raise ValueError (what is wrong, what to do) unless `path` can be written: its directory is made."""
    if path.is_dir():
        raise ValueError(f"{path} is a directory: name a file for the results")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    except OSError as exc:
        raise ValueError(f"cannot write the results to {path}: {exc.strerror or exc}; name a writable path") from exc
    os.close(fd)
    Path(probe).unlink(missing_ok=True)


def write_atomically(path: Path, data: bytes) -> None:
    """Write `data` to `path` all or nothing: readers see the old file or the new one, never half. The file
    gets the mode a plain write gives it (the old file's, else 0666 less the umask), not mkstemp's 0600: a
    CI job or a host user reading a container's bind-mounted results must still be able to."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}")
    # created 0666 less the umask, as a plain write would be (no umask juggling: it is process-wide)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        try:
            os.fchmod(fd, path.stat().st_mode & 0o7777)  # replacing a file: keep its mode
        except FileNotFoundError:
            pass
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
