"""What a MusicGen WAV was made from: the model's revision and the software that ran it.

A hub id resolves to the commit of the snapshot transformers loaded (its cache folder is named by
it); a folder that is such a snapshot gives the same commit; any other folder is identified by
the SHA-256 of its weight and config files, read once when the model loads.
"""

from __future__ import annotations

import hashlib
import importlib
import re
from pathlib import Path
from typing import Any

_SNAPSHOT = re.compile(r"snapshots/([0-9a-f]{40})(?:/|$)")
_IDENTITY_FILES = ("*.safetensors", "*.bin", "config.json", "generation_config.json")


def model_revision(model_id: str) -> str:
    """The commit of a hub snapshot, ``sha256:<hex>`` of a plain folder's files, or ``unknown``."""
    folder = Path(model_id)
    if not folder.is_dir():
        try:
            hub: Any = importlib.import_module("transformers.utils.hub")
            resolved = hub.cached_file(model_id, "config.json")
        except (OSError, ValueError):
            return "unknown"
        if resolved is None:
            return "unknown"
        folder = Path(resolved).parent
    found = _SNAPSHOT.search(folder.resolve().as_posix()) or _SNAPSHOT.search(folder.as_posix())
    if found:
        return found.group(1)
    digest = hashlib.sha256()
    files = sorted({path for pattern in _IDENTITY_FILES for path in folder.glob(pattern)})
    for path in files:
        digest.update(path.name.encode() + b"\0")
        with path.open("rb") as stream:
            while chunk := stream.read(1 << 20):
                digest.update(chunk)
    return f"sha256:{digest.hexdigest()}" if files else "unknown"


def software_versions() -> dict[str, str]:
    """The versions of torch and transformers, which decide the arithmetic."""
    return {name: str(importlib.import_module(name).__version__) for name in ("torch", "transformers")}
