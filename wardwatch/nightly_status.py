"""What the scheduler's nightly runs did, for the container healthcheck (deploy/healthcheck.py).

`wardwatch deploy scheduler` keeps a small JSON file in the data directory (no patient data):

    <data_dir>/nightly-status.json
        first_due       the first run due since the scheduler (re)started (ISO 8601, UTC)
        next_due        the run it waits for now
        last_start      the last run's start; after last_end while one runs
        last_end        the last run's end
        last_outcome    "succeeded" or "failed" (exit code of `wardwatch batch nightly` != 0: parity
                        failed, another nightly held the file, or it crashed)
        last_exit_code
        last_success    end of the last run that succeeded

A failed nightly used to show only as the scheduler's log line; with this the scheduler's container
turns unhealthy (`docker compose ps`) until a run succeeds. The transitions are pure (dict in, dict
out); the file is replaced atomically, so the healthcheck never reads half of it.
"""

from __future__ import annotations

import json
import os
import tempfile
from datetime import datetime, timedelta, timezone
from pathlib import Path

from wardwatch.settings import Settings

STATUS_FILE = "nightly-status.json"
# a daily run plus slack for a long run: a night without a success is noticed the next morning
STALE_AFTER = timedelta(hours=26)


def status_path(settings: Settings) -> Path:
    return Path(settings.data_dir) / STATUS_FILE


def _iso(at: datetime) -> str:
    return at.astimezone(timezone.utc).isoformat(timespec="seconds")


def scheduled(status: dict, due: datetime, *, first: bool) -> dict:
    """The scheduler waits for `due`; `first`: the first wait since it started."""
    return status | {"next_due": _iso(due)} | ({"first_due": _iso(due)} if first else {})


def started(status: dict, at: datetime) -> dict:
    return status | {"last_start": _iso(at)}


def finished(status: dict, at: datetime, exit_code: int) -> dict:
    ok = exit_code == 0
    return status | {"last_end": _iso(at), "last_exit_code": exit_code,
                     "last_outcome": "succeeded" if ok else "failed"} | ({"last_success": _iso(at)} if ok else {})


def problems(status: dict | None, now: datetime, stale_after: timedelta = STALE_AFTER) -> list[str]:
    """Why the nightly needs an operator (empty: it does not). No status yet: nothing has been due."""
    if not status:
        return []
    found = []
    if status.get("last_outcome") == "failed":
        found.append(f"the last scheduled nightly (started {status.get('last_start')}) failed with exit code "
                     f"{status.get('last_exit_code')}: see `docker compose logs scheduler` "
                     "(docs/operations.md, 'A nightly failed')")
    times = {k: datetime.fromisoformat(status[k]) for k in ("last_success", "first_due") if status.get(k)}
    if times:
        since = max(times.values())  # a success before the scheduler's restart does not count against it
        hours = (now - since) / timedelta(hours=1)
        if now - since > stale_after:
            what = (f"the last success at {status['last_success']}" if since == times.get("last_success")
                    else f"the first run was due at {status['first_due']}")
            found.append(f"no nightly succeeded for {hours:.0f} h ({what}; more than "
                         f"{stale_after / timedelta(hours=1):g} h)")
    return found


def read_status(path: Path) -> dict | None:
    """The status, None when there is no file yet; ValueError when it is not a status."""
    try:
        text = path.read_text()
    except FileNotFoundError:
        return None
    status = json.loads(text)
    if not isinstance(status, dict):
        raise ValueError(f"{path} does not hold a JSON object")
    return status


def write_status(path: Path, status: dict) -> None:
    """Replace the file atomically: temp file in the same directory, then rename."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(status, f, indent=2, sort_keys=True)
            f.write("\n")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def update(path: Path, change) -> None:
    """Read, change, write; re-read each time, so a `--once` run in the same container is kept."""
    try:
        current = read_status(path) or {}
    except ValueError:
        current = {}  # a broken file is replaced by what is known now
    write_status(path, change(current))
