"""Resolve an endpoint's source to a local checkpoint directory, and digest its files.

Digests are what the cache keys are made of. Hashing a 90 GB checkpoint takes minutes, so a digest
is remembered per (path, size, mtime, inode) in the cache directory and recomputed only when the
file changes.
"""
from __future__ import annotations

import contextlib
import fcntl
import json
import os
from pathlib import Path

from plateforme.builders.atomic import atomic_write_text
from plateforme.builders.engine_manifest import sha256_file
from plateforme.ci.manifest import SourceSpec

# Files of a checkpoint directory that define what gets built; anything else (READMEs, images,
# original .bin/.pth copies) is ignored.
_SOURCE_SUFFIXES = (".json", ".safetensors", ".model", ".txt", ".jinja")
_SOURCE_PATTERNS = ("tokenizer.model.v", ".model.v")


class SourceError(ValueError):
    """The source cannot be found or fetched; the message says what to do."""


def source_files(model_dir: Path) -> list[Path]:
    """The files of a checkpoint that matter to a build, relative order fixed."""
    files = []
    for path in sorted(model_dir.rglob("*")):
        if not path.is_file() or any(part.startswith(".") for part in path.relative_to(model_dir).parts):
            continue
        if path.name == "plateforme-asset.json":  # the asset cache's own marker (build time, ...)
            continue
        if path.suffix in _SOURCE_SUFFIXES or any(p in path.name for p in _SOURCE_PATTERNS) or path.name == "tekken.json":
            files.append(path)
    return files


def resolve_source(source: SourceSpec, cache_dir: Path) -> Path:
    """The local directory holding the source checkpoint (preparing a demo asset or fetching from the
    hub as needed)."""
    if source.asset is not None:
        from plateforme.builders.assets import prepare_assets

        return prepare_assets(names=[source.asset], progress=False)[source.asset]
    if source.path is not None:
        path = Path(source.path)
        if not path.is_dir():
            raise SourceError(f"source directory {path} does not exist")
        if not (path / "config.json").is_file():
            raise SourceError(f"source directory {path} has no config.json: not a Hugging Face checkpoint")
        return path
    return _from_hub(source, cache_dir / "hub")


def _from_hub(source: SourceSpec, hub_cache: Path) -> Path:
    """A hub snapshot (weights as safetensors, configs, tokenizer files), from the local hub cache when
    it is there."""
    try:
        from huggingface_hub import snapshot_download
        from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError
    except ImportError:  # pragma: no cover - transformers depends on huggingface_hub
        raise SourceError("hub sources need the huggingface_hub package") from None
    patterns = ["*.json", "*.safetensors", "tokenizer.model*", "*.model.v*", "*.txt", "*.jinja"]
    kwargs = dict(repo_id=source.hub, revision=source.revision, allow_patterns=patterns)
    # The user's own Hugging Face cache (HF_HUB_CACHE / HF_HOME) first: a 90 GB checkpoint already
    # downloaded there is not fetched again; then the pipeline's cache, where it downloads.
    for cache in (None, hub_cache):
        with contextlib.suppress(LocalEntryNotFoundError, FileNotFoundError, OSError):
            found = Path(snapshot_download(local_files_only=True, cache_dir=cache, **kwargs))
            # Another tool may have cached only part of it (the config, the tokenizer).
            if (found / "config.json").is_file() and any(found.glob("*.safetensors")):
                return found
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False"):
        from huggingface_hub.constants import HF_HUB_CACHE

        raise SourceError(
            f"{source.hub} is in neither local hub cache ({HF_HUB_CACHE}, {hub_cache}) and hub access is off "
            f"(HF_HUB_OFFLINE={os.environ['HF_HUB_OFFLINE']}). On a machine that reaches huggingface.co set "
            "HF_HUB_OFFLINE=0 (and HF_TOKEN for gated models); elsewhere download the checkpoint and give "
            "`source: {path: DIR}`"
        )
    try:
        return Path(snapshot_download(cache_dir=hub_cache, **kwargs))
    except (HfHubHTTPError, OSError, ValueError) as exc:
        raise SourceError(
            f"cannot fetch {source.hub} from the Hugging Face Hub: {type(exc).__name__}: {exc}. The hub cannot "
            "be reached from here or refused the request (gated models need HF_TOKEN); download the checkpoint "
            "elsewhere and give `source: {path: DIR}`"
        ) from None


class DigestMemo:
    """sha256 per file, remembered by (path, size, mtime_ns, inode) in a JSON file."""

    def __init__(self, path: Path):
        self.path = path
        self._entries: dict[str, dict] = {}
        with contextlib.suppress(OSError, ValueError):
            loaded = json.loads(path.read_text())
            if isinstance(loaded, dict):
                self._entries = loaded
        self._dirty = False

    def digest(self, file: Path) -> str:
        stat = file.stat()
        key = str(file.resolve())
        stamp = [stat.st_size, stat.st_mtime_ns, stat.st_ino]
        entry = self._entries.get(key)
        if entry and entry.get("stamp") == stamp:
            return entry["sha256"]
        digest = sha256_file(file)
        self._entries[key] = {"stamp": stamp, "sha256": digest}
        self._dirty = True
        return digest

    def save(self) -> None:
        if not self._dirty:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path.with_suffix(".lock"), "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            merged = {}
            with contextlib.suppress(OSError, ValueError):
                merged = json.loads(self.path.read_text())
            merged.update(self._entries)
            atomic_write_text(self.path, json.dumps(merged, indent=1) + "\n")
        self._dirty = False


def source_digests(model_dir: Path, memo: DigestMemo) -> dict[str, str]:
    """relative path -> sha256 of every file that matters to a build."""
    files = source_files(model_dir)
    if not files:
        raise SourceError(f"{model_dir} holds no checkpoint files")
    return {path.relative_to(model_dir).as_posix(): memo.digest(path) for path in files}
