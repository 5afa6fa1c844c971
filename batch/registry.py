"""The model registry: a directory of versions plus a `current` pointer.

    <model_dir>/<version>/model.onnx
    <model_dir>/<version>/card.json     the model card; its sha256 pins model.onnx
    <model_dir>/current                 text file holding the version to serve
    <model_dir>/candidate               text file naming a version to shadow-score (optional)
    <model_dir>/history.jsonl           every pointer change: who, when, why, from, to

A card is only handed out after the model file's digest matches it, so a tampered or half-copied
model is refused loudly instead of served. The model file carries the contract it was trained with
(features, imputation: schemas/model_contract.py), so an edited card is refused too.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import tempfile
from pathlib import Path

MODEL_FILE = "model.onnx"
CARD_FILE = "card.json"
CURRENT_FILE = "current"

_VERSION = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")  # a directory name, never a path


class ModelIntegrityError(ValueError):
    """The model file does not match the digest its card records."""


def check_version_name(version: str) -> str:
    if not _VERSION.match(version or ""):
        raise ValueError(f"invalid model version name {version!r}: use letters, digits, '.', '_' or '-'")
    return version


def model_path(model_dir: Path | str, version: str) -> Path:
    return Path(model_dir) / check_version_name(version) / MODEL_FILE


def card_path(model_dir: Path | str, version: str) -> Path:
    return Path(model_dir) / check_version_name(version) / CARD_FILE


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def load_card(model_dir: Path | str, version: str) -> dict:
    """The card of `version`, after checking model.onnx against the card's sha256."""
    card = json.loads(card_path(model_dir, version).read_text())
    if card.get("version") != version:
        raise ModelIntegrityError(f"card in {version!r} names version {card.get('version')!r}")
    actual = sha256_file(model_path(model_dir, version))
    if actual != card.get("sha256"):
        raise ModelIntegrityError(
            f"model file of version {version!r} does not match its card: sha256 {actual} != {card.get('sha256')}; "
            "refusing to load a modified model")
    return card


def list_versions(model_dir: Path | str) -> list[str]:
    """Versions that have a card, sorted by name."""
    root = Path(model_dir)
    if not root.is_dir():
        return []
    return sorted(p.name for p in root.iterdir() if (p / CARD_FILE).is_file() and _VERSION.match(p.name))


def current_version(model_dir: Path | str) -> str | None:
    """The version the `current` pointer names, or None when there is no pointer yet."""
    try:
        text = (Path(model_dir) / CURRENT_FILE).read_text().strip()
    except FileNotFoundError:
        return None
    return text or None


def write_synced(path: Path, data: bytes) -> None:
    """Write a file and fsync it: a rename that publishes it must never reach the disk before its
    bytes do (after a power loss, a pointer could name an empty model file)."""
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def fsync_directory(path: Path | str) -> None:
    """fsync a directory, so the entries created or renamed in it survive a power loss."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def set_current(model_dir: Path | str, version: str) -> None:
    """Point `current` at a verified version; the pointer is replaced atomically (never half-written)."""
    load_card(model_dir, version)  # refuse to point at a missing or tampered model
    _write_pointer(model_dir, CURRENT_FILE, version)


# --- pointers, verification, promotion and rollback ---------------------------------------------
#
#     <model_dir>/candidate       text file naming a version the worker may shadow-score (same format
#                                 as `current`); set when a trained model fails the promotion gate
#     <model_dir>/history.jsonl   one JSON line per pointer change: who, when, why, from, to

CANDIDATE_FILE = "candidate"
HISTORY_FILE = "history.jsonl"


def _write_pointer(model_dir: Path | str, name: str, version: str) -> None:
    """Replace a pointer file atomically (temp file, fsync, rename, fsync of the directory): readers
    see old or new, never half, and the change survives a power loss."""
    _replace_synced(Path(model_dir) / name, (version + "\n").encode())


def _replace_synced(path: Path, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    os.close(fd)
    try:
        write_synced(Path(tmp), data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_directory(path.parent)


def candidate_version(model_dir: Path | str) -> str | None:
    """The version the `candidate` pointer names, or None."""
    try:
        text = (Path(model_dir) / CANDIDATE_FILE).read_text().strip()
    except FileNotFoundError:
        return None
    return text or None


def set_candidate(model_dir: Path | str, version: str) -> None:
    """Point `candidate` at a verified version (the worker shadow-scores it; it never alerts)."""
    load_card(model_dir, version)
    _write_pointer(model_dir, CANDIDATE_FILE, version)


def clear_candidate(model_dir: Path | str) -> None:
    (Path(model_dir) / CANDIDATE_FILE).unlink(missing_ok=True)


def integrity(model_dir: Path | str, version: str) -> str:
    """'ok', 'tampered' (model.onnx differs from the card's sha256) or 'missing' (no model file)."""
    if not model_path(model_dir, version).is_file():
        return "missing"
    try:
        load_card(model_dir, version)
    except ModelIntegrityError:
        return "tampered"
    return "ok"


def contract_problems(model_dir: Path | str, version: str) -> list[str]:
    """Why `version` must not be served: integrity, card and ONNX signature checks (empty = servable).

    The same checks the scorer applies when it loads a model, run before a pointer moves."""
    from schemas.model_contract import ContractError, ModelContract, check_contract

    try:
        card = load_card(model_dir, version)
    except (OSError, ValueError) as exc:  # missing files, bad JSON, ModelIntegrityError
        return [f"{type(exc).__name__}: {exc}"]
    try:
        import onnxruntime as ort

        session = ort.InferenceSession(str(model_path(model_dir, version)), providers=["CPUExecutionProvider"])
        check_contract(ModelContract.from_card(card), session.get_inputs(), session.get_outputs(),
                       session.get_modelmeta().custom_metadata_map)
    except ContractError as exc:
        return [str(exc)]
    except Exception as exc:  # onnxruntime cannot load the file: not servable
        return [f"onnxruntime cannot load model.onnx: {type(exc).__name__}: {exc}"]
    return []


def read_history(model_dir: Path | str) -> list[dict]:
    """Every entry of history.jsonl. A line cut short by a crash while it was written is left out: its
    pointer write, which comes after it (promote, rollback), never happened."""
    path = Path(model_dir) / HISTORY_FILE
    if not path.exists():
        return []
    entries = []
    for line in path.read_text().splitlines():
        try:
            entries.append(json.loads(line))
        except ValueError:
            continue  # (a blank line too)
    return entries


NOT_APPLIED = "not_applied"  # history action: the entry before it never moved the pointer (a crash)


def unapplied_entry(model_dir: Path | str, history: list[dict] | None = None) -> dict | None:
    """The last `current` entry of the history when its pointer write never happened, else None.

    promote and rollback append their history line first and move the pointer second (both durable): a
    crash between the two leaves a last entry from the version `current` still names to another one.
    That entry did not take effect; the history, `model rollback` and `model list` must not count it."""
    entries = [e for e in (read_history(model_dir) if history is None else history)
               if e.get("pointer", CURRENT_FILE) == CURRENT_FILE]
    if not entries or entries[-1].get("action") == NOT_APPLIED:
        return None
    last, now = entries[-1], current_version(model_dir)
    return last if last.get("to") != now and last.get("from") == now else None


def _settle_history(model_dir: Path | str) -> None:
    """Record that the history's last entry never took effect (when so): before a new entry."""
    void = unapplied_entry(model_dir)
    if void is not None:
        _append_history(model_dir, _audit(
            NOT_APPLIED, CURRENT_FILE, void.get("from"), void.get("from"), "wardwatch",
            f"the {void.get('action')} to {void.get('to')} recorded at {void.get('at')} never moved the "
            f"pointer (interrupted): current still names {void.get('from')}"))


def _append_history(model_dir: Path | str, entry: dict) -> None:
    path = Path(model_dir) / HISTORY_FILE
    with open(path, "a+b") as f:
        torn = False  # the last line cut short by a crash: the new one starts on a line of its own
        if f.seek(0, os.SEEK_END) > 0:
            f.seek(-1, os.SEEK_END)
            torn = f.read(1) != b"\n"
        f.write((("\n" if torn else "") + json.dumps(entry, sort_keys=True) + "\n").encode())
        f.flush()
        os.fsync(f.fileno())


def _audit(action: str, pointer: str, previous: str | None, version: str | None, who: str | None,
           why: str) -> dict:
    import getpass
    from datetime import UTC, datetime

    return {"at": datetime.now(UTC).isoformat(timespec="seconds"), "action": action, "pointer": pointer,
            "from": previous, "to": version, "who": who or getpass.getuser(), "why": why}


class PromotionRefused(ValueError):
    """The version failed the checks a model must pass before it is served."""


def held_out_too_small(model_dir: Path | str, version: str) -> str | None:
    """Why the held-out figures on `version`'s card are too few to judge it by (batch.train.held_out_too_small:
    fewer than 20 held-out patients or 10 with an onset), or None (enough, or a card without them)."""
    from batch.train import held_out_too_small as too_small  # (the training stack: only when promoting)

    return too_small(load_card(model_dir, version).get("metrics") or {})


def promote(model_dir: Path | str, version: str, *, why: str, who: str | None = None) -> dict:
    """Make `version` current after the hash and contract checks; record who/when/why. Returns the entry.

    A version whose held-out set was too small to judge it is promoted all the same (the gate does not
    promote it on its own; a promotion by hand, with its reason, is someone's decision), and the entry
    records why its figures say nothing (`held_out_too_small`), for the history and the caller to show."""
    problems = contract_problems(model_dir, version)
    if problems:
        raise PromotionRefused(f"refusing to promote {version!r}:\n  - " + "\n  - ".join(problems))
    small = held_out_too_small(model_dir, version)
    _settle_history(model_dir)
    previous = current_version(model_dir)
    entry = _audit("promote", CURRENT_FILE, previous, version, who, why)
    if small:
        entry["held_out_too_small"] = small
    # the history line first, the pointer second: a crash between them leaves an entry that never took
    # effect (unapplied_entry tells it), never a `current` moved with no entry rollback could undo
    _append_history(model_dir, entry)
    _write_pointer(model_dir, CURRENT_FILE, version)
    if candidate_version(model_dir) == version:
        clear_candidate(model_dir)
    return entry


def _current_stack(history: list[dict]) -> list[str]:
    """The versions `current` has pointed at, oldest first, with rolled-back ones removed."""
    stack: list[str] = []
    before: list[str] | None = None  # the stack before the last entry (a not_applied entry restores it)
    for e in history:
        if e.get("pointer", CURRENT_FILE) != CURRENT_FILE:
            continue
        if e["action"] == NOT_APPLIED:
            stack, before = (before if before is not None else stack), None
            continue
        before = list(stack)
        if e["action"] == "promote":
            if not stack and e.get("from"):
                stack.append(e["from"])  # the version that was current before the history began
            stack.append(e["to"])
        elif e["action"] == "rollback" and stack:
            stack.pop()
    return stack


def rollback(model_dir: Path | str, *, why: str, who: str | None = None) -> dict:
    """Point `current` back at the version it named before the last promotion (still verified)."""
    history = read_history(model_dir)
    void = unapplied_entry(model_dir, history)
    stack = _current_stack([e for e in history if e is not void])
    now = current_version(model_dir)
    if now is None:
        raise PromotionRefused(f"nothing to roll back to: no model is current in {Path(model_dir)}; use "
                               "`wardwatch model promote VERSION` to choose one")
    if len(stack) < 2 or stack[-1] != now:
        raise PromotionRefused(
            f"nothing to roll back to: the history in {Path(model_dir) / HISTORY_FILE} has no earlier current "
            f"version for {now!r}; use `wardwatch model promote VERSION` to choose one")
    target = stack[-2]
    problems = contract_problems(model_dir, target)
    if problems:
        raise PromotionRefused(f"refusing to roll back to {target!r}:\n  - " + "\n  - ".join(problems))
    _settle_history(model_dir)
    entry = _audit("rollback", CURRENT_FILE, now, target, who, why)
    _append_history(model_dir, entry)  # first, as promote does
    _write_pointer(model_dir, CURRENT_FILE, target)
    return entry


def describe(model_dir: Path | str) -> list[dict]:
    """One row per version for `wardwatch model list`: pointers, integrity, held-out metrics, gate."""
    current, candidate = current_version(model_dir), candidate_version(model_dir)
    rows = []
    for version in list_versions(model_dir):
        try:
            card = json.loads(card_path(model_dir, version).read_text())
        except ValueError:
            card = {}
        metrics = card.get("metrics") or {}
        rows.append({
            "version": version, "current": version == current, "candidate": version == candidate,
            "sha256": integrity(model_dir, version), "created": card.get("created"),
            "auroc": (metrics.get("model") or {}).get("auroc"), "auprc": (metrics.get("model") or {}).get("auprc"),
            "news2_auroc": (metrics.get("news2") or {}).get("auroc"),
            "gate": (card.get("gate") or {}).get("decision"),
        })
    return rows


def write_card(model_dir: Path | str, version: str, card: dict) -> None:
    """Rewrite a card atomically and durably (its sha256 pins model.onnx, which never changes)."""
    _replace_synced(card_path(model_dir, version), (json.dumps(card, indent=2) + "\n").encode())
