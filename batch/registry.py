"""The model registry: a directory of versions plus a `current` pointer.

    <model_dir>/<version>/model.onnx
    <model_dir>/<version>/card.json     the model card; its sha256 pins model.onnx
    <model_dir>/current                 text file holding the version to serve

A card is only handed out after the model file's digest matches it, so a tampered or half-copied
model is refused loudly instead of served.
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


def set_current(model_dir: Path | str, version: str) -> None:
    """Point `current` at a verified version; the pointer is replaced atomically (never half-written)."""
    load_card(model_dir, version)  # refuse to point at a missing or tampered model
    root = Path(model_dir)
    fd, tmp = tempfile.mkstemp(dir=root, prefix=".current.")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(version + "\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, root / CURRENT_FILE)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
