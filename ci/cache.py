"""The pipeline's content-addressed cache.

An endpoint's key is the SHA-256 of its source files' digests, its manifest entry, plateforme's
version and, for TensorRT-LLM, the installed TensorRT-LLM version: the same key means the same
inputs, so every stage already completed under that key is reused. Each key owns one entry
directory; each stage writes its outputs there atomically and then a record
`stages/<stage>.json`, so a stage is either complete (record present) or redone.
"""
from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from plateforme.builders.atomic import atomic_write_text


def default_cache_dir() -> Path:
    from plateforme.paths import home

    return home() / "pipeline-cache"


def plateforme_version() -> str:
    import importlib.metadata

    try:
        return importlib.metadata.version("plateforme")
    except importlib.metadata.PackageNotFoundError:  # pragma: no cover - running from a bare checkout
        return "unknown"


def content_key(payload: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(payload, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


class CacheEntry:
    """One endpoint's outputs under one key."""

    def __init__(self, root: Path, name: str, key: str):
        self.name, self.key = name, key
        self.dir = root / "entries" / f"{name}-{key[:20]}"

    def path(self, *parts: str) -> Path:
        return self.dir.joinpath(*parts)

    def record(self, stage: str) -> dict[str, Any] | None:
        """The stage's completion record, or None when the stage has not completed under this key."""
        try:
            record = json.loads(self.path("stages", f"{stage}.json").read_text())
        except (OSError, ValueError):
            return None
        if not isinstance(record, dict) or record.get("key") != self.key:
            return None
        # Outputs whose files changed size since the stage completed are not reused.
        for relpath, size in (record.get("files") or {}).items():
            path = self.path(relpath)
            if not path.is_file() or path.stat().st_size != size:
                return None
        return record

    def complete(self, stage: str, record: dict[str, Any], outputs: list[str] = ()) -> dict[str, Any]:
        """Record a completed stage; `outputs` (directories relative to the entry) are listed with
        their file sizes so a damaged entry is noticed."""
        files = {}
        for output in outputs:
            for path in sorted(self.path(output).rglob("*")):
                if path.is_file():
                    files[path.relative_to(self.dir).as_posix()] = path.stat().st_size
        record = {"key": self.key, "stage": stage, **record, "files": files}
        atomic_write_text(self.path("stages", f"{stage}.json"), json.dumps(record, indent=2) + "\n")
        return record

    def forget(self, stage: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path("stages", f"{stage}.json"))

    @contextlib.contextmanager
    def lock(self) -> Iterator[None]:
        """Two pipelines building the same entry take turns."""
        self.dir.mkdir(parents=True, exist_ok=True)
        with open(self.dir / ".lock", "a") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)
