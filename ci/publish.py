"""The publish stage: one output directory a deployment can take as it is, written atomically.

    OUT/repository/            Triton model repository (plateforme serve --model-repository OUT/repository)
    OUT/models/<endpoint>/     the checkpoint / tokenizer each endpoint's Triton models read
    OUT/checkpoints/<endpoint>/  TensorRT-LLM checkpoint (tensorrt_llm engines)
    OUT/engines/<endpoint>/    TensorRT-LLM engine; the embedder's ONNX graph and TensorRT plan
    OUT/manifests/<endpoint>.json  build manifest: source and digests, key, stages, validation figures
    OUT/pipeline.json          the run: manifest entries, keys, versions
    OUT/SHA256SUMS             `sha256sum -c` list of every other file

The tree is assembled in a temporary sibling of OUT and renamed onto it only when complete: a
failed run leaves OUT as it was. The rendered configs name absolute paths; they are rendered against
the temporary tree (the renderer checks the files exist) and then pointed at OUT, so the published
repository reads the published files only. Files come from the cache as hard links where the
filesystem allows (cache files are never modified in place), else as copies.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

from plateforme.builders.atomic import atomic_directory
from plateforme.builders.engine_manifest import RENDER_RECORD, sha256_file

SUMS_FILE = "SHA256SUMS"
RUN_FILE = "pipeline.json"


class PublishError(RuntimeError):
    pass


def link_tree(source: Path, target: Path) -> None:
    def link(src: str, dst: str) -> None:
        try:
            os.link(src, dst)
        except OSError:
            shutil.copy2(src, dst)

    shutil.copytree(source, target, copy_function=link)


def _point_at(repository: Path, old: str, new: str) -> None:
    """Replace the temporary tree's path by the final one in the rendered configs."""
    for path in [*repository.rglob("config.pbtxt"), repository / RENDER_RECORD]:
        if path.is_file():
            text = path.read_text()
            if old in text:
                path.write_text(text.replace(old, new))


def write_sums(root: Path) -> dict[str, str]:
    sums = {}
    for path in sorted(root.rglob("*")):
        if path.is_file() and path.name != SUMS_FILE:
            sums[path.relative_to(root).as_posix()] = sha256_file(path)
    (root / SUMS_FILE).write_text("".join(f"{digest}  {name}\n" for name, digest in sums.items()))
    return sums


def read_sums(root: Path) -> dict[str, str]:
    sums = {}
    for line in (root / SUMS_FILE).read_text().splitlines():
        digest, _, name = line.partition("  ")
        sums[name] = digest
    return sums


def published_run_key(out: Path) -> str | None:
    """The run key of a complete publication in `out` whose files are all there with their sizes
    unchanged since (a cheap check; `sha256sum -c SHA256SUMS` is the full one)."""
    try:
        run = json.loads((out / RUN_FILE).read_text())
        sums = read_sums(out)
    except (OSError, ValueError):
        return None
    sizes = run.get("file_sizes") or {}
    for name in sums:
        path = out / name
        if not path.is_file() or (name in sizes and path.stat().st_size != sizes[name]):
            return None
    return run.get("run_key")


def publish(out: Path, stage_tree, render, run: dict[str, Any], expected_digests: dict[str, dict[str, str]]) -> dict:
    """Assemble and publish. `stage_tree(tmp)` places the artifacts, `render(tmp)` writes
    tmp/repository; `expected_digests` {relative dir: {file: sha256}} are checked against the published
    files (a cache entry modified since it was built fails here)."""
    out = Path(out).absolute()
    with atomic_directory(out) as tmp:
        stage_tree(tmp)
        render(tmp)
        _point_at(tmp / "repository", str(tmp), str(out))
        sums = write_sums(tmp)
        for directory, digests in expected_digests.items():
            for name, digest in digests.items():
                published = sums.get(f"{directory}/{name}")
                if published != digest:
                    raise PublishError(f"{directory}/{name}: its SHA-256 {published} is not the {digest} recorded "
                                       "when it was built: the pipeline cache was modified; remove "
                                       f"{directory.split('/')[-1]}'s cache entry and run again")
        sizes = {name: (tmp / name).stat().st_size for name in sums}
        (tmp / RUN_FILE).write_text(json.dumps({**run, "file_sizes": sizes}, indent=2) + "\n")
        # pipeline.json changed after the sums were taken: list it last, with its own digest.
        with open(tmp / SUMS_FILE, "a") as handle:
            handle.write(f"{sha256_file(tmp / RUN_FILE)}  {RUN_FILE}\n")
    return {"out": str(out), "files": len(sums) + 2}
