"""Result files of demo / soak / bench: refused before the run when unwritable, replaced atomically."""

from __future__ import annotations

import os
import stat

import pytest
from typer.testing import CliRunner

import benchmarks.pipeline
import wardwatch.demo
import wardwatch.soak
from wardwatch.cli import app
from wardwatch.result_files import check_writable, write_atomically


def never_run(*args, **kwargs):
    raise AssertionError("the long run started although its results could not be written")


@pytest.mark.timeout(60)
@pytest.mark.parametrize(("option", "extra", "module", "runner"), [
    (["demo", "--summary-json"], ["--data-dir", "{tmp}/data"], wardwatch.demo, "run_demo"),
    (["soak", "--json"], ["--data-dir", "{tmp}/data"], wardwatch.soak, "run_soak"),
    (["bench", "--json"], [], benchmarks.pipeline, "run_bench"),
])
def test_a_results_path_that_cannot_be_written_fails_before_the_run(option, extra, module, runner, tmp_path,
                                                                    monkeypatch):
    """A path under a regular file: the run (minutes; the batch bench 20) used to finish first and then end in a
    traceback, its results lost."""
    monkeypatch.setattr(module, runner, never_run)
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("")
    args = [*option, str(blocker / "out.json"), *(a.format(tmp=tmp_path) for a in extra)]
    result = CliRunner().invoke(app, args,
                                env={"WARDWATCH_BOOTSTRAP_SERVERS": ""})
    assert result.exit_code == 2, result.output
    assert "cannot write the results to" in result.output


def test_check_writable_refuses_a_directory_and_makes_missing_parents(tmp_path):
    with pytest.raises(ValueError, match="is a directory"):
        check_writable(tmp_path)
    check_writable(tmp_path / "new" / "dir" / "out.json")
    assert (tmp_path / "new" / "dir").is_dir() and list((tmp_path / "new" / "dir").iterdir()) == []


def test_a_write_that_fails_midway_leaves_the_previous_results_whole(tmp_path, monkeypatch):
    """bench.json, read by the README's table, was written in place: a kill mid-write left it truncated."""
    path = tmp_path / "bench.json"
    write_atomically(path, b'{"old": true}')

    import os
    real_replace = os.replace

    def killed(*args):
        raise KeyboardInterrupt  # the process interrupted between writing and renaming

    monkeypatch.setattr(os, "replace", killed)
    with pytest.raises(KeyboardInterrupt):
        write_atomically(path, b'{"new": ' + b"1" * 100_000)
    monkeypatch.setattr(os, "replace", real_replace)
    assert path.read_bytes() == b'{"old": true}'
    assert [p.name for p in tmp_path.iterdir()] == ["bench.json"]  # no temp file left behind


def test_a_result_file_is_as_readable_as_a_plain_write_makes_it(tmp_path):
    """mkstemp's 0600 made the results unreadable to anyone else (a CI job, the host user of a bind mount)."""
    old = os.umask(0o022)
    try:
        fresh = tmp_path / "fresh.json"
        write_atomically(fresh, b"{}")
        assert stat.S_IMODE(fresh.stat().st_mode) == 0o644
        kept = tmp_path / "kept.json"
        kept.write_bytes(b"{}")
        kept.chmod(0o664)
        write_atomically(kept, b"{}")
        assert stat.S_IMODE(kept.stat().st_mode) == 0o664
    finally:
        os.umask(old)
