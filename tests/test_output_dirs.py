"""Every command that writes a directory replaces it whole, so each refuses a target whose loss
would hurt: a file, a directory that is one of its inputs, or a non-empty directory that holds
no earlier output of the same kind."""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from plateforme.builders.atomic import check_replaceable
from plateforme.builders.convert import convert_checkpoint
from plateforme.cli import main

CPU_DEMO = Path(__file__).resolve().parent.parent / "ci" / "manifests" / "cpu-demo.yaml"
BUILD_PROFILE = ["--max-input-len", "128", "--max-output-len", "64", "--max-num-tokens", "256"]


@pytest.fixture(scope="module")
def trtllm_ckpt(tmp_path_factory, tiny_mistral_dir):
    return convert_checkpoint(tiny_mistral_dir, tmp_path_factory.mktemp("ckpt") / "mistral", progress=False).out_dir


def commands(hf: Path, ckpt: Path, out: Path, tmp_path: Path) -> dict[str, list[str]]:
    """Each writer's command line writing `out` from the checkpoints `hf` (Hugging Face) and `ckpt`
    (TensorRT-LLM)."""
    return {
        "repo": ["repo", "--out", str(out), "--endpoint", f"mistral-tiny={hf}"],
        "convert": ["convert", str(hf), str(out), "--quiet"],
        "build": ["build", str(ckpt), str(out), *BUILD_PROFILE, "--dry-run"],
        "pipeline": ["pipeline", "run", str(CPU_DEMO), "--out", str(out), "--cache-dir", str(tmp_path / "cache")],
    }


@pytest.mark.parametrize("command", ["repo", "convert", "build", "pipeline"])
def test_a_directory_of_other_files_is_refused_and_kept(command, tmp_path, tiny_mistral_dir, trtllm_ckpt, capsys):
    out = tmp_path / "work"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    assert main(commands(tiny_mistral_dir, trtllm_ckpt, out, tmp_path)[command]) == 2
    assert "is not empty and holds no" in capsys.readouterr().err
    assert [p.name for p in out.iterdir()] == ["notes.txt"] and (out / "notes.txt").read_text() == "keep me"


@pytest.mark.parametrize("command", ["repo", "convert", "build", "pipeline"])
def test_a_file_is_refused_and_kept(command, tmp_path, tiny_mistral_dir, trtllm_ckpt, capsys):
    out = tmp_path / "notes.txt"
    out.write_text("keep me")
    assert main(commands(tiny_mistral_dir, trtllm_ckpt, out, tmp_path)[command]) == 2
    assert "exists and is not a directory" in capsys.readouterr().err
    assert out.read_text() == "keep me"


@pytest.mark.parametrize("command", ["repo", "convert", "build"])
def test_the_input_checkpoint_is_refused_and_kept(command, tmp_path, tiny_mistral_dir, trtllm_ckpt, capsys):
    hf, ckpt = shutil.copytree(tiny_mistral_dir, tmp_path / "hf"), shutil.copytree(trtllm_ckpt, tmp_path / "ckpt")
    before = {path: sorted(p.name for p in path.iterdir()) for path in (hf, ckpt)}
    out = ckpt if command == "build" else hf
    assert main(commands(hf, ckpt, out, tmp_path)[command]) == 2
    assert "an input of this run" in capsys.readouterr().err
    assert {path: sorted(p.name for p in path.iterdir()) for path in (hf, ckpt)} == before


def test_the_pipeline_refuses_to_publish_over_its_cache(tmp_path, capsys):
    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / "digests.json").write_text("{}")
    assert main(["pipeline", "run", str(CPU_DEMO), "--out", str(tmp_path), "--cache-dir", str(cache)]) == 2
    assert "an input of this run" in capsys.readouterr().err
    assert (cache / "digests.json").read_text() == "{}"


def test_an_earlier_output_or_an_empty_directory_is_replaceable(tmp_path):
    earlier, empty = tmp_path / "earlier", tmp_path / "empty"
    for directory in (earlier, empty):
        directory.mkdir()
    (earlier / "marker.json").write_text("{}")
    for directory in (earlier, empty, tmp_path / "new"):
        check_replaceable(directory, lambda d: (d / "marker.json").is_file(), "earlier output", [tmp_path / "input"])
    with pytest.raises(ValueError, match="would replace .*input, an input of this run"):
        check_replaceable(tmp_path, lambda d: True, "earlier output", [tmp_path / "input"])
