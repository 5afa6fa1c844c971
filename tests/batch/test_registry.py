"""The model registry's pointers and its CLI: list, promote (hash + contract checked), rollback."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

from batch import registry
from wardwatch.cli import app

BUNDLED = Path(__file__).parents[2] / "wardwatch" / "models" / "v0001"


def add_version(model_dir: Path, version: str, auroc: float = 0.7) -> None:
    """A real ONNX model (the bundled one) registered under another version name."""
    target = model_dir / version
    target.mkdir(parents=True)
    shutil.copy(BUNDLED / "model.onnx", target / "model.onnx")
    card = json.loads((BUNDLED / "card.json").read_text())
    card["version"] = version
    card["metrics"] = {"model": {"auroc": auroc, "auprc": 0.3}, "news2": {"auroc": 0.6, "auprc": 0.2}}
    (target / "card.json").write_text(json.dumps(card))


def tamper(model_dir: Path, version: str) -> None:
    path = registry.model_path(model_dir, version)
    path.write_bytes(path.read_bytes() + b"\0")


@pytest.fixture
def models(tmp_path) -> Path:
    model_dir = tmp_path / "models"
    for i, version in enumerate(("v1", "v2", "v3")):
        add_version(model_dir, version, auroc=0.7 + i / 100)
    return model_dir


def cli(model_dir: Path, *args: str):
    return CliRunner().invoke(app, ["model", *args], env={"WARDWATCH_MODEL_DIR": str(model_dir)})


def test_promote_switches_current_and_records_who_when_why(models):
    registry.promote(models, "v1", why="first", who="alice")
    entry = registry.promote(models, "v2", why="better AUROC", who="bob")
    assert registry.current_version(models) == "v2"
    assert (entry["from"], entry["to"], entry["who"], entry["why"]) == ("v1", "v2", "bob", "better AUROC")
    assert [(e["action"], e["to"]) for e in registry.read_history(models)] == [("promote", "v1"), ("promote", "v2")]
    assert all(e["at"] for e in registry.read_history(models))


def test_tampered_model_is_refused_by_promote_and_current_stays(models):
    registry.promote(models, "v1", why="first")
    tamper(models, "v2")
    with pytest.raises(registry.PromotionRefused, match="does not match its card"):
        registry.promote(models, "v2", why="should fail")
    assert registry.current_version(models) == "v1"
    assert len(registry.read_history(models)) == 1


def test_card_that_breaks_the_contract_is_refused(models):
    card = json.loads(registry.card_path(models, "v3").read_text())
    card["features"] = card["features"][:-1]  # the ONNX input is one wider than the card now says
    del card["imputation"][card["features"][0]]
    registry.card_path(models, "v3").write_text(json.dumps(card))
    problems = registry.contract_problems(models, "v3")
    assert any("takes" in p and "features" in p for p in problems)
    with pytest.raises(registry.PromotionRefused):
        registry.promote(models, "v3", why="x")
    assert registry.current_version(models) is None


def test_rollback_walks_back_through_promotions(models):
    for version in ("v1", "v2", "v3"):
        registry.promote(models, version, why="next")
    assert registry.rollback(models, why="v3 alerts too much")["to"] == "v2"
    assert registry.current_version(models) == "v2"
    assert registry.rollback(models, why="v2 too")["to"] == "v1"
    with pytest.raises(registry.PromotionRefused, match="nothing to roll back to"):
        registry.rollback(models, why="no earlier version")
    assert registry.current_version(models) == "v1"


def test_rollback_refuses_a_tampered_previous_version(models):
    registry.promote(models, "v1", why="a")
    registry.promote(models, "v2", why="b")
    tamper(models, "v1")
    with pytest.raises(registry.PromotionRefused, match="roll back to 'v1'"):
        registry.rollback(models, why="c")
    assert registry.current_version(models) == "v2"


def test_promoting_the_candidate_clears_the_candidate_pointer(models):
    registry.set_candidate(models, "v2")
    assert registry.candidate_version(models) == "v2"
    registry.promote(models, "v2", why="shadow looked good")
    assert registry.candidate_version(models) is None
    # pointers are plain text files the worker reads, same format as `current`
    assert (models / "current").read_text() == "v2\n"


def test_cli_list_shows_pointers_metrics_and_tampering(models, monkeypatch):
    from wardwatch import cli as cli_module

    monkeypatch.setattr(cli_module.console, "width", 200)  # a terminal wide enough for every column
    registry.promote(models, "v1", why="a")
    registry.set_candidate(models, "v3")
    tamper(models, "v2")
    result = cli(models, "list")
    assert result.exit_code == 0, result.output
    rows = [line for line in result.output.splitlines() if " v1 " in line or " v2 " in line or " v3 " in line]
    v1, v2, v3 = (next(r for r in rows if f" {v} " in r) for v in ("v1", "v2", "v3"))
    assert "current" in v1 and "ok" in v1 and "0.700" in v1
    assert "tampered" in v2
    assert "candidate" in v3 and "0.720" in v3


def test_cli_promote_and_rollback(models):
    assert cli(models, "promote", "v1", "--reason", "initial").exit_code == 0
    result = cli(models, "promote", "v2")
    assert result.exit_code == 0 and "v1 -> v2" in result.output
    tamper(models, "v3")
    refused = cli(models, "promote", "v3")
    assert refused.exit_code == 1 and "refusing to promote" in refused.output
    result = cli(models, "rollback", "--reason", "alert storm")
    assert result.exit_code == 0 and "v2 -> v1" in result.output
    assert registry.current_version(models) == "v1"
    assert registry.read_history(models)[-1]["why"] == "alert storm"


def test_a_rewritten_card_is_on_disk_before_it_replaces_the_old_one(models, monkeypatch):
    synced: list[int] = []
    fsync = os.fsync

    def recording_fsync(fd):
        synced.append(os.fstat(fd).st_ino)
        fsync(fd)

    monkeypatch.setattr(os, "fsync", recording_fsync)
    card = json.loads(registry.card_path(models, "v1").read_text()) | {"promoted": True}
    registry.write_card(models, "v1", card)
    # the new card's bytes, then the directory holding the rename
    assert synced == [registry.card_path(models, "v1").stat().st_ino, (models / "v1").stat().st_ino]
    assert registry.load_card(models, "v1")["promoted"] is True


def test_promoting_by_hand_a_version_judged_on_too_few_patients_works_and_says_so(models):
    """The gate never promotes on such a held-out set; a person may (the shipped model was made current by
    hand), but is told the figures say nothing, and the history keeps that with the reason given."""
    path = registry.card_path(models, "v2")
    card = json.loads(path.read_text())
    card["metrics"]["bootstrap"] = {"patients": 2, "patients_with_onset": 1, "resamples": 500}
    path.write_text(json.dumps(card))

    result = CliRunner().invoke(app, ["model", "promote", "v2", "--reason", "demo, judged by eye"],
                                  env={"WARDWATCH_MODEL_DIR": str(models)})
    assert result.exit_code == 0, result.output
    assert registry.current_version(models) == "v2"
    assert "current: None -> v2" in result.stdout
    assert "warning: v2's held-out set was too small to judge it: 2 patients, 1 of them with an onset" in result.stderr
    [entry] = registry.read_history(models)
    assert entry["why"] == "demo, judged by eye" and entry["held_out_too_small"].startswith("2 patients, 1 of them")
    # a version judged on enough patients: no warning, no such field
    result = cli(models, "promote", "v3")
    assert result.exit_code == 0 and "warning" not in result.output
    assert "held_out_too_small" not in registry.read_history(models)[-1]


def test_a_crash_between_the_history_line_and_the_pointer_leaves_rollback_and_list_truthful(models, monkeypatch):
    """A promotion writes two files (history.jsonl, the `current` pointer): interrupted after the first,
    whichever it is, `model rollback` still works and `model list` names the model that is served."""
    registry.promote(models, "v1", why="first")
    registry.promote(models, "v2", why="second")
    writes = {"n": 0}

    def crashing(real):
        def write(*args, **kwargs):
            writes["n"] += 1
            if writes["n"] == 2:  # the second of the promotion's two writes: the process dies
                raise OSError("simulated crash")
            return real(*args, **kwargs)
        return write

    monkeypatch.setattr(registry, "_write_pointer", crashing(registry._write_pointer))
    monkeypatch.setattr(registry, "_append_history", crashing(registry._append_history))
    with pytest.raises(OSError, match="simulated crash"):
        registry.promote(models, "v3", why="third")
    monkeypatch.undo()
    served = registry.current_version(models)
    listed = cli(models, "list")
    assert listed.exit_code == 0, listed.output
    if served == "v2":  # the promotion never took effect: list says the v3 entry did not
        assert "never took effect: current still names v2" in listed.output
    result = cli(models, "rollback", "--reason", "after the crash")
    assert result.exit_code == 0, result.output
    # back to the version before the one served: v2 -> v1 (the interrupted v3 never counted)
    assert f"{served} -> v1" in result.output and registry.current_version(models) == "v1"
    assert "never took effect" not in cli(models, "list").output
    # and the history goes on: promoting v3 for real, then rolling back, returns to v1
    registry.promote(models, "v3", why="again")
    assert registry.rollback(models, why="again")["to"] == "v1"


def test_a_history_line_cut_short_by_a_crash_does_not_break_the_registry(models):
    registry.promote(models, "v1", why="first")
    registry.promote(models, "v2", why="second")
    with open(models / registry.HISTORY_FILE, "a") as f:
        f.write('{"action": "promote", "fr')
    assert [e["to"] for e in registry.read_history(models)] == ["v1", "v2"]
    assert registry.rollback(models, why="torn line")["to"] == "v1"
    # the next line starts on a line of its own: the history stays readable
    assert [e["to"] for e in registry.read_history(models)] == ["v1", "v2", "v1"]
