"""Crash-safe file helpers shared by every file the library writes (JSON and safetensors only).

Everything is written to a temporary name in the target directory and renamed into place,
so a reader (or a process killed mid-write) never sees half a file.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path

__all__ = ["atomic_write_json", "sha256_file", "fsync_file", "read_json_or_none", "ensure_writable_dir",
           "read_manifest"]


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def fsync_file(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def read_json_or_none(path: Path) -> dict | None:
    try:
        return json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError):
        return None


def atomic_write_json(path: Path, payload: dict) -> None:
    """Write JSON to a temporary file in the same directory, then rename it into place."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(payload, f, indent=2, sort_keys=True)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def ensure_writable_dir(directory: Path, error: type[Exception], what: str = "directory",
                        fix: str = "choose another one") -> None:
    """Create ``directory`` if needed; raise ``error`` naming the fix when it cannot be written."""
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise error(f"cannot create {what} '{directory}' ({err.strerror}); {fix}") from None
    if not os.access(directory, os.W_OK):
        raise error(f"{what} '{directory}' is not writable; {fix}")


def read_manifest(path: Path, error: type[Exception], format_name: str, version: int, what: str,
                  missing: str, redo: str) -> dict:
    """Read one of our JSON manifests, checking that it exists, parses, and has our format and version.

    Each failure raises ``error`` naming the file; ``missing`` is the sentence telling how such
    files are made, ``redo`` the fix for a corrupt or outdated one (e.g. "refit the factors").
    """
    path = Path(path)
    if not path.is_file():
        raise error(f"no {what} at '{path.parent}': {path} does not exist. {missing}")
    try:
        manifest = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise error(f"{path} is corrupt ({err}); {redo}") from None
    if not isinstance(manifest, dict) or manifest.get("format") != format_name:
        raise error(f"{path} is not a lightning-influence {what} manifest; point to the directory they were "
                    f"saved to, or {redo}")
    if manifest.get("format_version") != version:
        raise error(f"{path} has format version {manifest.get('format_version')}, this library reads version "
                    f"{version} (written by lightning-influence {manifest.get('library_version')}); "
                    f"{redo} with this version")
    return manifest
