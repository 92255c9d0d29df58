"""The CI engine-build pipeline (`plateforme pipeline run`): the cpu-demo manifest end to end through a
real tritonserver, the cache, fault injection (damaged weights, mismatched tokenizer, impossible
mappings, a TensorRT-LLM build without TensorRT-LLM), and manifest errors."""
from __future__ import annotations

import hashlib
import json
import shutil
import struct
from pathlib import Path

import pytest
import yaml

from plateforme import cli
from plateforme.builders.tiny import TinySpec, make_tiny_checkpoint, mistral_tokenizer_file

REPO_ROOT = Path(__file__).resolve().parent.parent
CPU_DEMO = REPO_ROOT / "ci" / "manifests" / "cpu-demo.yaml"
GPU_MANIFEST = REPO_ROOT / "ci" / "manifests" / "gpu-mistral.yaml"


def run_cli(capsys, *args) -> tuple[int, str]:
    code = cli.main(["pipeline", "run", *map(str, args)])
    captured = capsys.readouterr()
    return code, captured.out + captured.err


def write_manifest(path: Path, endpoints: dict) -> Path:
    path.write_text(yaml.safe_dump({"version": 1, "endpoints": endpoints}))
    return path


def tree_state(root: Path) -> dict[str, tuple[int, int]]:
    """relative path -> (mtime_ns, inode) of every file."""
    return {p.relative_to(root).as_posix(): (p.stat().st_mtime_ns, p.stat().st_ino)
            for p in root.rglob("*") if p.is_file()}


# -- the cpu-demo manifest, end to end ------------------------------------------------------------
@pytest.fixture(scope="module")
def demo_run(tmp_path_factory, demo_assets):
    root = tmp_path_factory.mktemp("pipeline-demo")
    cache, out = root / "cache", root / "published"
    code = cli.main(["pipeline", "run", str(CPU_DEMO), "--cache-dir", str(cache), "--out", str(out)])
    return code, cache, out


@pytest.mark.server
@pytest.mark.slow
def test_cpu_demo_pipeline_publishes_a_served_repository(demo_run):
    code, cache, out = demo_run
    assert code == 0
    # Every file listed with its real digest, and nothing else in the tree.
    sums = {}
    for line in (out / "SHA256SUMS").read_text().splitlines():
        digest, name = line.split("  ", 1)
        sums[name] = digest
    files = {p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()} - {"SHA256SUMS"}
    assert set(sums) == files
    for name, digest in sums.items():
        assert hashlib.sha256((out / name).read_bytes()).hexdigest() == digest, name
    # The repository reads the published files, not the cache nor the temporary tree.
    configs = "".join(p.read_text() for p in (out / "repository").rglob("config.pbtxt"))
    assert str(out / "models" / "mistral-tiny") in configs
    assert str(cache) not in configs and ".partial-" not in configs
    assert (out / "repository" / "mistral-embed" / "1" / "onnx" / "model.onnx").is_file()
    # Build manifests carry the validation figures and the tolerance they were held to.
    tiny = json.loads((out / "manifests" / "mistral-tiny.json").read_text())
    parity = tiny["records"]["validate"]["report"]["parity"]
    assert parity["atol"] == 1e-3 and parity["max_abs_diff"] <= 1e-3 and parity["argmax_mismatches"] == 0
    assert all(stage["status"] == "ok" for stage in tiny["stages"].values())
    engine = tiny["records"]["validate"]["report"]["engine"]
    assert (engine["dtype"], engine["max_batch_size"], engine["max_seq_len"]) == ("float32", 8, "2048")
    embed = json.loads((out / "manifests" / "mistral-embed.json").read_text())
    assert embed["records"]["validate"]["report"]["onnx"]["min_cosine"] > 0.9999
    smoke = json.loads(next((cache / "smoke").glob("*.json")).read_text())
    assert "Paris" in smoke["mistral-tiny"]["answer"] and smoke["mistral-tiny"]["chunks"] > 1
    assert smoke["mistral-embed"]["dim"] == 384 and smoke["mistral-embed"]["cosine"] > 0.5


@pytest.mark.slow
def test_rerun_with_unchanged_inputs_is_all_cached(demo_run, monkeypatch, capsys):
    code, cache, out = demo_run
    assert code == 0
    from plateforme.ci import pipeline as pipeline_mod

    def forbidden(*args, **kwargs):
        raise AssertionError("work was redone on a cache hit")

    # Any conversion, build, check or server start would now fail its stage.
    for name in ("_convert", "_build", "_validate", "_stage_copy"):
        monkeypatch.setattr(pipeline_mod.Pipeline, name, forbidden)
    monkeypatch.setattr("plateforme.ci.smoke.smoke_test", forbidden)
    monkeypatch.setattr("plateforme.ci.publish.publish", forbidden)
    before_cache, before_out = tree_state(cache / "entries"), tree_state(out)

    report = pipeline_mod.run_pipeline(CPU_DEMO, cache_dir=cache, out=out)
    assert report.ok, report.failure_message()
    for run in report.endpoints:
        assert {stage: report.status(run.name, stage) for stage in pipeline_mod.STAGES} == dict.fromkeys(
            pipeline_mod.STAGES, "cached")
    assert tree_state(cache / "entries") == before_cache
    assert tree_state(out) == before_out


# -- fault injection ----------------------------------------------------------------------------
@pytest.fixture
def tiny_source(tmp_path, tiny_mistral_dir):
    source = tmp_path / "source"
    shutil.copytree(tiny_mistral_dir, source)
    return source


def _truncate(path: Path) -> str:
    data = path.read_bytes()
    path.write_bytes(data[:-1000])
    return "truncated"


def _damage_header(path: Path) -> str:
    data = bytearray(path.read_bytes())
    (length,) = struct.unpack("<Q", data[:8])
    data[8 + length // 2: 8 + length // 2 + 16] = b"\x00\xff" * 8
    path.write_bytes(bytes(data))
    return "not valid JSON"


def _poison_weights(path: Path) -> str:
    """NaNs in the middle of a float32 tensor: the header stays valid, the bytes do not."""
    data = bytearray(path.read_bytes())
    (length,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8:8 + length])
    start, end = header["model.layers.1.mlp.down_proj.weight"]["data_offsets"]
    middle = 8 + length + (start + end) // 2 // 4 * 4
    data[middle:middle + 16] = struct.pack("<4f", *[float("nan")] * 4)
    path.write_bytes(bytes(data))
    return "NaN or infinite"


@pytest.mark.parametrize("damage", [_truncate, _damage_header, _poison_weights])
def test_damaged_safetensors_fails_in_convert_and_publishes_nothing(damage, tmp_path, tiny_source,
                                                                    tiny_mistral_dir, capsys):
    manifest = write_manifest(tmp_path / "m.yaml", {"mistral-tiny": {"source": str(tiny_source), "dtype": "float32"}})
    weights = tiny_source / "model.safetensors"
    expected = damage(weights)
    out, cache = tmp_path / "out", tmp_path / "cache"
    code, output = run_cli(capsys, manifest, "--cache-dir", cache, "--out", out)
    assert code == 1
    assert "endpoint mistral-tiny, stage convert" in output
    assert str(weights) in output and expected in output
    assert not out.exists() and not list(tmp_path.glob(".out.*"))

    shutil.copyfile(tiny_mistral_dir / "model.safetensors", weights)
    code, output = run_cli(capsys, manifest, "--cache-dir", cache, "--out", out, "--stages", "convert,build,validate")
    assert code == 0, output


@pytest.mark.server
def test_tokenizer_that_does_not_fit_the_vocabulary_fails_in_validate(tmp_path, capsys):
    # A model with Mistral's v1 vocabulary (32,000 rows) shipped with the v3 tokenizer (32,768 tokens).
    source = make_tiny_checkpoint(tmp_path / "source", TinySpec("mistral", "v1", sliding_window=None))
    (source / "tokenizer.model.v1").unlink()
    shutil.copyfile(mistral_tokenizer_file("v3"), source / "tokenizer.model.v3")
    manifest = write_manifest(tmp_path / "m.yaml", {"mistral-tiny": {"source": str(source), "dtype": "float32",
                                                                      "profile": {"max_batch_size": 2}}})
    out, cache = tmp_path / "out", tmp_path / "cache"
    code, output = run_cli(capsys, manifest, "--cache-dir", cache, "--out", out)
    assert code == 1
    assert "endpoint mistral-tiny, stage validate" in output
    assert "32768 tokens" in output and "32000 rows" in output
    # One line per result, however long (the console is not a terminal here: 80 columns).
    failed = next(line for line in output.splitlines() if line.lstrip().startswith("FAILED mistral-tiny: validate"))
    assert len(failed) > 80 and "32768 tokens" in failed and "32000 rows" in failed
    assert not out.exists()

    (source / "tokenizer.model.v3").unlink()
    shutil.copyfile(mistral_tokenizer_file("v1"), source / "tokenizer.model.v1")
    code, output = run_cli(capsys, manifest, "--cache-dir", cache, "--out", out)
    assert code == 0, output
    assert (out / "SHA256SUMS").is_file()
    assert (out / "models" / "mistral-tiny" / "tokenizer.model.v1").is_file()
    assert not (out / "models" / "mistral-tiny" / "tokenizer.model.v3").exists()

    # A cache entry altered after it was built is caught when it is published again elsewhere.
    staged = next((cache / "entries").glob("mistral-tiny-*/hf/config.json"))
    text = staged.read_text()
    staged.unlink()  # a new file: the publication above keeps its own (hard-linked) copy
    staged.write_text(text.replace('"bos_token_id": 1', '"bos_token_id": 7'))
    code, output = run_cli(capsys, manifest, "--cache-dir", cache, "--out", tmp_path / "out2")
    assert code == 1
    assert "stage publish" in output and "models/mistral-tiny/config.json" in output and "cache was modified" in output
    assert not (tmp_path / "out2").exists() and not list(tmp_path.glob(".out2.*"))
    assert json.loads((out / "models" / "mistral-tiny" / "config.json").read_text())["bos_token_id"] == 1


@pytest.fixture(scope="module")
def three_expert_mixtral(tmp_path_factory):
    return make_tiny_checkpoint(tmp_path_factory.mktemp("tiny") / "mixtral-3",
                                TinySpec("mixtral", "v1", sliding_window=None, num_local_experts=3))


@pytest.mark.parametrize("endpoint, bad_mapping, reason, fixed_mapping", [
    ("mistral-tiny", {"tp": 3}, "tp_size (3) does not divide num_attention_heads (4)", {"tp": 2}),
    ("mistral-small", {"tp": 2, "moe_ep": 2}, "moe_ep_size (2) does not divide the 3 experts", {"tp": 2, "moe_tp": 2}),
])
def test_impossible_mapping_fails_with_the_reason(endpoint, bad_mapping, reason, fixed_mapping, tmp_path, capsys,
                                                  tiny_mistral_dir, three_expert_mixtral):
    source = tiny_mistral_dir if endpoint == "mistral-tiny" else three_expert_mixtral
    spec = {"source": str(source), "engine": "tensorrt_llm", "dtype": "float32",
            "profile": {"max_input_len": 128, "max_seq_len": 256, "max_num_tokens": 256}}
    manifest = write_manifest(tmp_path / "m.yaml", {endpoint: {**spec, "mapping": bad_mapping}})
    out, cache = tmp_path / "out", tmp_path / "cache"
    code, output = run_cli(capsys, manifest, "--cache-dir", cache, "--out", out)
    assert code == 1
    assert f"endpoint {endpoint}, stage convert" in output and reason in output
    assert not out.exists()

    write_manifest(manifest, {endpoint: {**spec, "mapping": fixed_mapping}})
    code, output = run_cli(capsys, manifest, "--cache-dir", cache, "--out", out, "--stages", "convert")
    assert code == 0, output
    checkpoint = next((cache / "entries").glob(f"{endpoint}-*/trtllm-checkpoint"))
    assert sorted(p.name for p in checkpoint.glob("rank*.safetensors")) == ["rank0.safetensors", "rank1.safetensors"]


def test_build_profile_beyond_the_model_context_fails_in_convert(tmp_path, capsys, tiny_mistral_dir):
    manifest = write_manifest(tmp_path / "m.yaml", {"mistral-tiny": {
        "source": str(tiny_mistral_dir), "engine": "tensorrt_llm", "profile": {"max_seq_len": 8192}}})
    code, output = run_cli(capsys, manifest, "--cache-dir", tmp_path / "cache", "--out", tmp_path / "out")
    assert code == 1
    assert "endpoint mistral-tiny, stage convert" in output and "exceeds the model's context of 256 tokens" in output


def test_pytorch_engine_refuses_a_multi_gpu_mapping(tmp_path, capsys, tiny_mistral_dir):
    manifest = write_manifest(tmp_path / "m.yaml", {"mistral-tiny": {"source": str(tiny_mistral_dir),
                                                                      "mapping": {"tp": 2}}})
    code, output = run_cli(capsys, manifest, "--cache-dir", tmp_path / "cache", "--out", tmp_path / "out")
    assert code == 1
    assert "endpoint mistral-tiny, stage convert" in output and "runs on one device" in output


def test_tensorrt_llm_build_without_tensorrt_llm_fails_clearly(tmp_path, capsys, tiny_mistral_dir):
    manifest = write_manifest(tmp_path / "m.yaml", {"mistral-tiny": {
        "source": str(tiny_mistral_dir), "engine": "tensorrt_llm", "dtype": "bfloat16",
        "profile": {"max_batch_size": 4, "max_input_len": 128, "max_seq_len": 256, "max_num_tokens": 256}}})
    out, cache = tmp_path / "out", tmp_path / "cache"
    code, output = run_cli(capsys, manifest, "--cache-dir", cache, "--out", out)
    assert code == 1
    assert "endpoint mistral-tiny, stage build" in output
    assert "TensorRT-LLM is not installed" in output
    # Conversion did its part, and planned the exact trtllm-build command; nothing was built or published.
    assert list((cache / "entries").glob("mistral-tiny-*/trtllm-checkpoint/rank0.safetensors"))
    convert = json.loads(next((cache / "entries").glob("mistral-tiny-*/stages/convert.json")).read_text())
    plan = convert["trtllm_build_plan"]
    assert plan[0] == "trtllm-build" and plan[plan.index("--max_seq_len") + 1] == "256"
    assert not list((cache / "entries").glob("mistral-tiny-*/engine")) and not out.exists()
    # The served endpoint will read the HF config and mistral-common's tokenizer file, not the weights.
    staged = {path.name for path in next((cache / "entries").glob("mistral-tiny-*/hf")).iterdir()}
    assert "config.json" in staged and any(name.endswith(".model.v3") for name in staged)
    assert not any(name.endswith(".safetensors") for name in staged)


def test_hub_source_without_hub_access_says_so(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    manifest = write_manifest(tmp_path / "m.yaml", {"mistral-tiny": {
        "source": {"hub": "mistralai/Mistral-7B-Instruct-v0.2"}}})
    code, output = run_cli(capsys, manifest, "--cache-dir", tmp_path / "cache", "--out", tmp_path / "out")
    assert code == 1
    assert "endpoint mistral-tiny, stage convert" in output
    assert "mistralai/Mistral-7B-Instruct-v0.2" in output and "hub access is off" in output


def test_hub_source_is_found_in_the_users_hugging_face_cache(tmp_path, capsys, monkeypatch, tiny_mistral_dir):
    """A checkpoint already in HF_HUB_CACHE is used as it is, with hub access off."""
    import huggingface_hub.constants

    commit = "0" * 40
    repo = tmp_path / "hf-cache" / "models--someone--tiny-mistral"
    shutil.copytree(tiny_mistral_dir, repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hf-cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    manifest = write_manifest(tmp_path / "m.yaml", {"mistral-tiny": {"source": {"hub": "someone/tiny-mistral"},
                                                                     "dtype": "float32"}})
    cache = tmp_path / "cache"
    code, output = run_cli(capsys, manifest, "--cache-dir", cache, "--out", tmp_path / "out", "--stages", "convert")
    assert code == 0, output
    assert not (cache / "hub").exists()  # nothing downloaded or copied into the pipeline's hub cache
    assert list((cache / "entries").glob("mistral-tiny-*/stages/convert.json"))
    # Only part of a checkpoint there (another tool cached its config): not taken for the whole.
    for weights in (repo / "snapshots" / commit).glob("*.safetensors"):
        weights.unlink()
    code, output = run_cli(capsys, manifest, "--cache-dir", tmp_path / "cache2", "--out", tmp_path / "out",
                           "--stages", "convert")
    assert code == 1 and "is in neither local hub cache" in output


# -- manifest errors ------------------------------------------------------------------------------
@pytest.mark.parametrize("entry, message", [
    ({"source": "smollm2-mistral", "colour": "blue"}, "endpoint mistral-tiny: field colour: unknown field"),
    ({"source": "smollm2-mistral", "dtype": "fp8"}, "endpoint mistral-tiny: field dtype: Input should be 'auto'"),
    ({"source": "smollm2-mistral", "engine": "vllm"}, "endpoint mistral-tiny: field engine: unknown engine kind 'vllm'"),
    ({"source": "smollm2-mistral", "mapping": {"tp": 2, "moe_tp": 2, "moe_ep": 2}},
     "endpoint mistral-tiny: field mapping: moe_tp_size (2) x moe_ep_size (2) = 4 must equal tp_size (2)"),
    ({"source": {"hub": "mistralai/Mistral-7B-Instruct-v0.2", "path": "/models/m"}},
     "endpoint mistral-tiny: field source: give exactly one of asset, path, hub"),
    ({"source": "smollm2-mistral", "profile": {"max_batch_size": 0}},
     "endpoint mistral-tiny: field profile.max_batch_size: Input should be greater than 0"),
    ({"source": "smollm2-mistral", "mapping": {"tp": True}},
     "endpoint mistral-tiny: field mapping.tp: Input should be a valid integer"),
])
def test_manifest_errors_name_the_endpoint_and_field(entry, message, tmp_path, capsys):
    manifest = write_manifest(tmp_path / "m.yaml", {"mistral-tiny": entry})
    code, output = run_cli(capsys, manifest, "--cache-dir", tmp_path / "cache")
    assert code == 2
    assert message in output
    assert not (tmp_path / "cache").exists()  # refused before any work


def test_unreadable_manifests_and_stages_are_refused(tmp_path, capsys):
    code, output = run_cli(capsys, tmp_path / "missing.yaml")
    assert code == 2 and "cannot read manifest" in output
    (tmp_path / "bad.yaml").write_text("endpoints: [unclosed")
    code, output = run_cli(capsys, tmp_path / "bad.yaml")
    assert code == 2 and "is not valid YAML" in output
    code, output = run_cli(capsys, CPU_DEMO, "--stages", "convert,compile")
    assert code == 2 and "unknown stage(s) ['compile']" in output


def test_shipped_manifests_validate():
    from plateforme.ci.manifest import load_manifest

    cpu = load_manifest(CPU_DEMO)
    assert {name: spec.engine for name, spec in cpu.endpoints.items()} == {
        "mistral-tiny": "pytorch", "mistral-small": "pytorch", "mistral-embed": "pytorch"}
    gpu = load_manifest(GPU_MANIFEST)
    assert gpu.endpoints["mistral-tiny"].source.hub == "mistralai/Mistral-7B-Instruct-v0.2"
    assert gpu.endpoints["mistral-small"].source.hub == "mistralai/Mixtral-8x7B-Instruct-v0.1"
    assert all(spec.engine == "tensorrt_llm" for spec in gpu.endpoints.values())
