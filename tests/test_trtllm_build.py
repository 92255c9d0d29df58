"""`plateforme build` up to the process boundary with TensorRT-LLM, the build manifest, and the
`tensorrtllm` engine variant of `plateforme repo`.

TensorRT-LLM cannot be installed here. Where it would run, these tests put a FAKE `trtllm-build`
(and `nvidia-smi`, and `tensorrt_llm`/`tensorrt` package metadata) on the paths: it records the argv
it receives and writes files shaped like trtllm-build's output. No engine is built by these tests.
"""
from __future__ import annotations

import importlib.util
import json
import os
import shlex
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2

from plateforme.builders import engine_manifest, trtllm_build
from plateforme.builders.convert import convert_checkpoint
from plateforme.builders.engine_manifest import (
    ENGINE_MANIFEST,
    EngineCheckError,
    check_repository_engines,
    checkpoint_digest,
    read_engine_manifest,
    tokenizer_digest,
)
from plateforme.builders.mapping import Mapping
from plateforme.builders.repository import ChatEndpoint, EmbeddingEndpoint, RepositoryError, render_repository
from plateforme.builders.trtllm_build import PROFILES, BuildError, BuildProfile, Toolchain, build_engine
from plateforme.cli import main

FAKE_VERSION = "0.99.0"
FAKE_GPU = "NVIDIA H100 80GB HBM3"
SMALL = dict(max_input_len=128, max_output_len=128, max_num_tokens=256)

# Stands in for trtllm-build: records its argv, writes what trtllm-build writes (config.json with
# the TensorRT-LLM version, one rank{N}.engine per rank), exits with $FAKE_TRTLLM_EXIT.
FAKE_TRTLLM_BUILD = textwrap.dedent(f"""
    import json, os, sys
    from pathlib import Path
    argv = sys.argv[1:]
    with open(os.environ["FAKE_TRTLLM_ARGV"], "a") as log:
        log.write(json.dumps(argv) + "\\n")
    status = int(os.environ.get("FAKE_TRTLLM_EXIT", "0"))
    if status:
        sys.exit(status)
    opt = {{argv[i][2:]: argv[i + 1] for i in range(0, len(argv) - 1, 2) if argv[i].startswith("--")}}
    checkpoint = json.loads((Path(opt["checkpoint_dir"]) / "config.json").read_text())
    out = Path(opt["output_dir"])
    out.mkdir(parents=True, exist_ok=True)
    build = {{"max_batch_size": int(opt["max_batch_size"]), "max_seq_len": int(opt["max_seq_len"])}}
    (out / "config.json").write_text(json.dumps(
        {{"version": "{FAKE_VERSION}", "pretrained_config": checkpoint, "build_config": build}}))
    for rank in range(checkpoint["mapping"]["world_size"]):
        (out / f"rank{{rank}}.engine").write_bytes(b"not an engine")
""")


@pytest.fixture(scope="module")
def fake_tools(tmp_path_factory):
    """(bin dir, site dir): fake trtllm-build and nvidia-smi; tensorrt_llm and tensorrt metadata."""
    root = tmp_path_factory.mktemp("fake-tensorrt-llm")
    bin_dir, site = root / "bin", root / "site"
    bin_dir.mkdir()
    (site / "tensorrt_llm").mkdir(parents=True)
    (site / "tensorrt_llm" / "__init__.py").write_text(f'__version__ = "{FAKE_VERSION}"\n')
    for name, version in (("tensorrt_llm", FAKE_VERSION), ("tensorrt", "10.9.0")):
        info = site / f"{name}-{version}.dist-info"
        info.mkdir()
        (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")
    script = bin_dir / "trtllm-build"
    script.write_text(f"#!{sys.executable}\n{FAKE_TRTLLM_BUILD}")
    smi = bin_dir / "nvidia-smi"
    smi.write_text(f"#!/bin/sh\necho '{FAKE_GPU}'\n")
    for path in (script, smi):
        path.chmod(0o755)
    return bin_dir, site


@pytest.fixture(scope="module")
def mistral_ckpt(tmp_path_factory, tiny_mistral_dir):
    out = tmp_path_factory.mktemp("ckpt") / "mistral"
    return convert_checkpoint(tiny_mistral_dir, out, "bfloat16", progress=False).out_dir


@pytest.fixture(scope="module")
def mixtral_ckpt(tmp_path_factory, tiny_mixtral_dir):
    out = tmp_path_factory.mktemp("ckpt") / "mixtral"
    return convert_checkpoint(tiny_mixtral_dir, out, "bfloat16", Mapping.create(2, moe_ep=2), progress=False).out_dir


def fake_build(monkeypatch, tmp_path, fake_tools, checkpoint: Path, engine: Path, **profile) -> Path:
    """build_engine in process, with the fake toolchain standing in for TensorRT-LLM."""
    bin_dir, _ = fake_tools
    monkeypatch.setenv("FAKE_TRTLLM_ARGV", str(tmp_path / "argv.log"))
    monkeypatch.setattr(trtllm_build, "detect_toolchain",
                        lambda: Toolchain(str(bin_dir / "trtllm-build"), FAKE_VERSION, "10.9.0", FAKE_GPU))
    profile = PROFILES["mistral-tiny"].with_overrides(**{**SMALL, **profile})
    build_engine(checkpoint, engine, profile,
                 run=lambda argv: subprocess.run([sys.executable, *argv]).returncode)
    return engine


# -- the trtllm-build command -----------------------------------------------------------------
def test_dense_command_is_exact(mistral_ckpt, tmp_path):
    result = build_engine(mistral_ckpt, tmp_path / "engine", PROFILES["mistral-tiny"].with_overrides(**SMALL),
                          dry_run=True)
    assert result.command == [
        "trtllm-build", "--checkpoint_dir", str(mistral_ckpt), "--output_dir", str(tmp_path / "engine"),
        "--max_batch_size", "64", "--max_input_len", "128", "--max_seq_len", "256", "--max_num_tokens", "256",
        "--max_beam_width", "1", "--kv_cache_type", "paged",
        "--gpt_attention_plugin", "bfloat16", "--gemm_plugin", "bfloat16",
        "--context_fmha", "enable", "--use_paged_context_fmha", "enable", "--remove_input_padding", "enable",
    ]
    assert result.manifest is None and not (tmp_path / "engine").exists()


@pytest.mark.parametrize("moe_plugin,expected", [
    ("builtin", ["--moe_plugin", "bfloat16"]),
    ("none", ["--moe_plugin", "disable"]),
])
def test_moe_plugin_choices(mixtral_ckpt, tmp_path, moe_plugin, expected):
    profile = PROFILES["mistral-small"].with_overrides(**SMALL, moe_plugin=moe_plugin, workers=2)
    command = build_engine(mixtral_ckpt, tmp_path / "engine", profile, dry_run=True).command
    assert command[command.index("--remove_input_padding") + 2:] == expected + ["--workers", "2"]


def test_custom_moe_plugin_uses_plateformes_model_class(mixtral_ckpt, mistral_ckpt, tmp_path):
    moe_plugin = pytest.importorskip("plateforme.builders.moe_plugin")
    profile = PROFILES["mistral-small"].with_overrides(**SMALL, moe_plugin="custom")
    command = build_engine(mixtral_ckpt, tmp_path / "engine", profile, dry_run=True).command
    tail = command[command.index("--remove_input_padding") + 2:]
    assert tail == moe_plugin.custom_moe_build_args("bfloat16")
    assert "--model_cls_file" in tail and "--model_cls_name" in tail
    # A dense checkpoint has no MoE layers: no MoE flag at all, and asking for the custom plugin is a mistake.
    dense = build_engine(mistral_ckpt, tmp_path / "engine", PROFILES["mistral-tiny"].with_overrides(**SMALL),
                         dry_run=True).command
    assert "--moe_plugin" not in dense and "--model_cls_file" not in dense
    with pytest.raises(BuildError, match="--moe-plugin custom is for MoE checkpoints; .* is a dense one"):
        build_engine(mistral_ckpt, tmp_path / "engine", PROFILES["mistral-tiny"].with_overrides(
            **SMALL, moe_plugin="custom"), dry_run=True)


@pytest.mark.parametrize("overrides,message", [
    (dict(max_input_len=200, max_output_len=100), r"300 exceeds the model's context of 256 tokens"),
    (dict(max_num_tokens=64), r"max_num_tokens \(64\) must be at least max_input_len \(128\)"),
    (dict(gpt_attention_plugin="disable"), "need the GPT attention plugin"),
    (dict(workers=2), "2 workers for a checkpoint of 1 rank"),
    (dict(max_batch_size=0), "max_batch_size must be a positive integer"),
    (dict(gemm_plugin="int4"), "gemm_plugin must be one of"),
])
def test_profile_checks(mistral_ckpt, tmp_path, overrides, message):
    with pytest.raises(BuildError, match=message):
        build_engine(mistral_ckpt, tmp_path / "e", PROFILES["mistral-tiny"].with_overrides(**{**SMALL, **overrides}),
                     dry_run=True)


def test_cli_dry_run_prints_the_command(mixtral_ckpt, tmp_path, capsys):
    args = ["build", str(mixtral_ckpt), str(tmp_path / "engine"), "--max-input-len", "128",
            "--max-output-len", "128", "--max-num-tokens", "256", "--dry-run"]
    assert main(args) == 0
    printed = shlex.split(capsys.readouterr().out)
    assert printed[0] == "trtllm-build" and printed[printed.index("--moe_plugin") + 1] == "bfloat16"
    assert printed[printed.index("--max_batch_size") + 1] == "64"  # the default profile of MoE: mistral-small


def test_build_errors(tmp_path, mistral_ckpt, capsys):
    assert main(["build", str(tmp_path), str(tmp_path / "e"), "--dry-run"]) == 2
    assert "has no config.json: not a TensorRT-LLM checkpoint" in capsys.readouterr().err
    # A rank file cut short since the conversion (a copy interrupted, say) is named.
    copy = shutil.copytree(mistral_ckpt, tmp_path / "copy")
    (copy / "rank0.safetensors").write_bytes((copy / "rank0.safetensors").read_bytes()[:100])
    args = ["build", str(copy), str(tmp_path / "e"), "--max-input-len", "128", "--max-output-len", "64",
            "--max-num-tokens", "256", "--dry-run"]
    assert main(args) == 2
    assert "rank0.safetensors has 100 bytes; plateforme convert wrote" in capsys.readouterr().err


@pytest.mark.skipif(importlib.util.find_spec("tensorrt_llm") is not None, reason="TensorRT-LLM is installed")
def test_without_tensorrt_llm_the_error_names_it(mistral_ckpt, tmp_path):
    profile = PROFILES["mistral-tiny"].with_overrides(**SMALL)
    with pytest.raises(BuildError, match=r"TensorRT-LLM is not installed.*tensorrt_llm.*plateforme\[tensorrt-llm\]"):
        build_engine(mistral_ckpt, tmp_path / "engine", profile)
    assert not (tmp_path / "engine").exists()


def test_each_missing_piece_is_named(fake_tools, tmp_path, monkeypatch):
    bin_dir, site = fake_tools
    partial = tmp_path / "site"
    partial.mkdir()
    for entry in site.iterdir():  # tensorrt_llm without tensorrt
        if not entry.name.startswith("tensorrt-"):
            os.symlink(entry, partial / entry.name)
    monkeypatch.syspath_prepend(str(partial))
    monkeypatch.setenv("PATH", str(bin_dir))
    with pytest.raises(BuildError, match=r"TensorRT \(the Python package tensorrt\).*not installed"):
        trtllm_build.detect_toolchain()
    monkeypatch.syspath_prepend(str(site))
    assert trtllm_build.detect_toolchain() == Toolchain(str(bin_dir / "trtllm-build"), FAKE_VERSION, "10.9.0",
                                                        FAKE_GPU)
    only_smi = tmp_path / "bin"
    only_smi.mkdir()
    os.symlink(bin_dir / "nvidia-smi", only_smi / "nvidia-smi")
    monkeypatch.setenv("PATH", str(only_smi))
    with pytest.raises(BuildError, match="trtllm-build command is not on PATH"):
        trtllm_build.detect_toolchain()
    only_build = tmp_path / "bin2"
    only_build.mkdir()
    os.symlink(bin_dir / "trtllm-build", only_build / "trtllm-build")
    monkeypatch.setenv("PATH", str(only_build))
    with pytest.raises(BuildError, match="no NVIDIA GPU is visible"):
        trtllm_build.detect_toolchain()


# -- the process boundary: plateforme build running a (fake) trtllm-build -----------------------
def run_cli(fake_tools, tmp_path, *args: str, exit_status: int = 0) -> subprocess.CompletedProcess:
    bin_dir, site = fake_tools
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", "PYTHONPATH": str(site),
           "FAKE_TRTLLM_ARGV": str(tmp_path / "argv.log"), "FAKE_TRTLLM_EXIT": str(exit_status)}
    return subprocess.run([sys.executable, "-m", "plateforme.cli", *args], env=env, capture_output=True, text=True)


def test_build_runs_trtllm_build_and_writes_the_manifest(fake_tools, tmp_path, mixtral_ckpt, tiny_mixtral_dir):
    engine = tmp_path / "engines" / "mixtral-tp2"
    result = run_cli(fake_tools, tmp_path, "build", str(mixtral_ckpt), str(engine), "--max-input-len", "128",
                     "--max-output-len", "128", "--max-num-tokens", "256", "--max-batch-size", "8")
    assert result.returncode == 0, result.stderr
    assert f"TensorRT-LLM {FAKE_VERSION}, TensorRT 10.9.0, {FAKE_GPU}" in result.stdout
    [argv] = [json.loads(line) for line in (tmp_path / "argv.log").read_text().splitlines()]
    # trtllm-build wrote into a temporary sibling, renamed onto the engine directory once complete.
    output_dir = Path(argv[argv.index("--output_dir") + 1])
    assert output_dir.parent == engine.parent and output_dir.name.startswith(".mixtral-tp2.partial-")
    expected = build_engine(mixtral_ckpt, engine, PROFILES["mistral-small"].with_overrides(**SMALL, max_batch_size=8),
                            dry_run=True).command
    assert argv == [str(output_dir) if a == str(engine) else a for a in expected[1:]]
    assert sorted(p.name for p in engine.iterdir()) == ["config.json", ENGINE_MANIFEST, "rank0.engine",
                                                       "rank1.engine"]
    manifest = read_engine_manifest(engine)
    assert manifest.tensorrt_llm_version == FAKE_VERSION and manifest.tensorrt_version == "10.9.0"
    assert manifest.gpu == FAKE_GPU and manifest.command == expected
    assert manifest.flags["profile"] == "mistral-small" and manifest.flags["max_seq_len"] == 256
    assert manifest.checkpoint["digest"] == checkpoint_digest(mixtral_ckpt)
    assert manifest.checkpoint["mapping"]["world_size"] == 2 and manifest.checkpoint["vocab_size"] == 32000
    assert manifest.tokenizer["digest"] == tokenizer_digest(tiny_mixtral_dir)
    assert manifest.sliding_window is None


def test_a_failed_trtllm_build_leaves_no_engine(fake_tools, tmp_path, mistral_ckpt):
    engine = tmp_path / "engine"
    result = run_cli(fake_tools, tmp_path, "build", str(mistral_ckpt), str(engine), "--max-input-len", "128",
                     "--max-output-len", "128", "--max-num-tokens", "256", exit_status=3)
    assert result.returncode == 2
    assert "trtllm-build failed with exit status 3" in result.stderr
    assert list(tmp_path.iterdir()) == [tmp_path / "argv.log"]


# -- plateforme repo with a TensorRT-LLM engine ----------------------------------------------
def parse_config(path: Path) -> model_config_pb2.ModelConfig:
    return text_format.Parse(path.read_text(), model_config_pb2.ModelConfig())


def params(config: model_config_pb2.ModelConfig) -> dict[str, str]:
    return {key: value.string_value for key, value in config.parameters.items()}


@pytest.mark.parametrize("variant", ["pytorch", "tensorrtllm"])
def test_every_rendered_config_parses_as_a_triton_model_config(
    variant, monkeypatch, tmp_path, fake_tools, mistral_ckpt, tiny_mistral_dir, tiny_mixtral_dir, demo_assets
):
    """All models, both engine variants: Triton's ModelConfig protobuf, with the expected values."""
    engine = fake_build(monkeypatch, tmp_path, fake_tools, mistral_ckpt, tmp_path / "engine") \
        if variant == "tensorrtllm" else None
    chat = [ChatEndpoint("mistral-tiny", tiny_mistral_dir, engine=variant, engine_dir=engine,
                         kv_cache_free_gpu_mem_fraction=0.85, max_batch_size=8),
            ChatEndpoint("mistral-small", tiny_mixtral_dir, max_batch_size=8)]
    embed = EmbeddingEndpoint("mistral-embed", demo_assets["minilm-embed"])
    out = render_repository(tmp_path / "repo", chat, [embed])
    configs = {p.parent.name: parse_config(p) for p in out.glob("*/config.pbtxt")}
    assert len(configs) == 11
    for name, config in configs.items():
        assert config.name == name
    tiny = str(tiny_mistral_dir.absolute())
    engine_config = configs["mistral-tiny-engine"]
    assert engine_config.max_batch_size == 8 and engine_config.model_transaction_policy.decoupled
    if variant == "tensorrtllm":
        assert engine_config.backend == "tensorrtllm"
        values = params(engine_config)
        assert values["gpt_model_path"] == str(engine.absolute())
        assert values["gpt_model_type"] == "inflight_fused_batching"
        assert values["max_attention_window_size"] == "16"  # the tiny Mistral's sliding window
        assert values["kv_cache_free_gpu_mem_fraction"] == "0.85"
        assert values["exclude_input_in_output"] == "true" and values["max_beam_width"] == "1"
        assert values["tokenizer_dir"] == tiny
        assert values["max_tokens_in_paged_kv_cache"] == "${max_tokens_in_paged_kv_cache}"  # unset: ignored
        assert params(configs["mistral-tiny-preprocessing"])["max_seq_len"] == "256"  # the engine's
        assert {o.name for o in engine_config.output} >= {"output_ids", "sequence_length"}
    else:
        assert engine_config.backend == "python"
        assert params(engine_config)["engine_dir"] == tiny
    assert params(configs["mistral-tiny-preprocessing"])["tokenizer_dir"] == tiny
    assert params(configs["mistral-tiny-postprocessing"])["tokenizer_dir"] == tiny
    assert params(configs["mistral-tiny-bls"])["engine_model"] == "mistral-tiny-engine"
    ensemble = configs["mistral-tiny"]
    assert ensemble.platform == "ensemble"
    assert [s.model_name for s in ensemble.ensemble_scheduling.step] == [
        "mistral-tiny-preprocessing", "mistral-tiny-engine", "mistral-tiny-postprocessing"]
    assert configs["mistral-small-engine"].backend == "python"
    assert params(configs["mistral-embed"])["model_dir"] == str(demo_assets["minilm-embed"].absolute())


def test_engine_of_another_tensorrt_llm_version_is_refused(monkeypatch, tmp_path, fake_tools, mistral_ckpt,
                                                           tiny_mistral_dir):
    engine = fake_build(monkeypatch, tmp_path, fake_tools, mistral_ckpt, tmp_path / "engine")
    endpoint = ChatEndpoint("mistral-tiny", tiny_mistral_dir, engine="tensorrtllm", engine_dir=engine, max_batch_size=8)
    monkeypatch.setattr(engine_manifest, "installed_trtllm_version", lambda: "1.0.0")
    with pytest.raises(RepositoryError, match=rf"built by TensorRT-LLM {FAKE_VERSION}, but TensorRT-LLM 1.0.0 is "
                                              rf"installed.*Rebuild.*plateforme build {mistral_ckpt}"):
        render_repository(tmp_path / "repo", [endpoint])
    assert not (tmp_path / "repo").exists()
    monkeypatch.setattr(engine_manifest, "installed_trtllm_version", lambda: FAKE_VERSION)
    repo = render_repository(tmp_path / "repo", [endpoint])
    # Serve time: the same check against what is installed where it runs.
    assert len(check_repository_engines(repo)) == 1
    with pytest.raises(EngineCheckError, match="endpoint mistral-tiny: engine .* built by TensorRT-LLM 0.99.0"):
        check_repository_engines(repo, trtllm_version="1.0.0")
    monkeypatch.setattr(engine_manifest, "installed_trtllm_version", lambda: "1.0.0")
    assert main(["serve", "--model-repository", str(repo)]) == 2  # refused before starting tritonserver


def test_engine_with_another_vocabulary_is_refused(monkeypatch, tmp_path, fake_tools, mistral_ckpt,
                                                   tiny_mixtral_dir):
    engine = fake_build(monkeypatch, tmp_path, fake_tools, mistral_ckpt, tmp_path / "engine")
    # The engine came with the v3 tokenizer (32768 tokens); the v1 tokenizer (32000) fits in size only.
    endpoint = ChatEndpoint("mistral-tiny", tiny_mixtral_dir, engine="tensorrtllm", engine_dir=engine, max_batch_size=8)
    with pytest.raises(RepositoryError, match="is not the one engine .* was converted with.*plateforme convert"):
        render_repository(tmp_path / "repo", [endpoint])


def test_tokenizer_larger_than_the_engine_vocabulary_is_refused(monkeypatch, tmp_path, fake_tools, tiny_mistral_dir):
    from transformers import LlamaConfig, LlamaForCausalLM

    LlamaForCausalLM(LlamaConfig(vocab_size=1000, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                 num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=512)
                     ).save_pretrained(tmp_path / "llama")
    ckpt = convert_checkpoint(tmp_path / "llama", tmp_path / "ckpt", progress=False).out_dir
    engine = fake_build(monkeypatch, tmp_path, fake_tools, ckpt, tmp_path / "engine")
    endpoint = ChatEndpoint("m", tiny_mistral_dir, engine="tensorrtllm", engine_dir=engine, max_batch_size=8)
    with pytest.raises(RepositoryError, match="has 32768 tokens but engine .* has a vocabulary of 1000"):
        render_repository(tmp_path / "repo", [endpoint])


def test_render_refusals(monkeypatch, tmp_path, fake_tools, mistral_ckpt, tiny_mistral_dir):
    engine = fake_build(monkeypatch, tmp_path, fake_tools, mistral_ckpt, tmp_path / "engine", max_batch_size=8)
    with pytest.raises(RepositoryError, match="max_batch_size 16 exceeds the 8 the engine was built for"):
        render_repository(tmp_path / "repo", [ChatEndpoint("m", tiny_mistral_dir, engine="tensorrtllm",
                                                           engine_dir=engine, max_batch_size=16)])
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(RepositoryError, match="not a TensorRT-LLM engine directory"):
        render_repository(tmp_path / "repo", [ChatEndpoint("m", tiny_mistral_dir, engine="tensorrtllm",
                                                           engine_dir=empty)])
    (engine / "rank0.engine").unlink()
    with pytest.raises(RepositoryError, match="lacks rank0.engine of its 1 rank.*incomplete.*plateforme build"):
        render_repository(tmp_path / "repo", [ChatEndpoint("m", tiny_mistral_dir, engine="tensorrtllm",
                                                           engine_dir=engine, max_batch_size=8)])


def test_multi_gpu_engines_get_the_mpirun_launch(monkeypatch, tmp_path, fake_tools, mixtral_ckpt, mistral_ckpt,
                                                 tiny_mistral_dir, tiny_mixtral_dir, capsys):
    engine = fake_build(monkeypatch, tmp_path, fake_tools, mixtral_ckpt, tmp_path / "mixtral-tp2")
    repo = tmp_path / "repo"
    assert main(["repo", "--out", str(repo), "--endpoint", f"mistral-small={tiny_mixtral_dir}",
                 "--engine-dir", f"mistral-small={engine}", "--max-batch-size", "8"]) == 0
    launch = json.loads((repo / "plateforme.json").read_text())["launch"]
    common = [f"--model-repository={repo}", "--http-port=8000", "--grpc-port=8001", "--metrics-port=8002"]
    assert launch == [
        "mpirun", "--allow-run-as-root",
        "-n", "1", "tritonserver", *common, "--disable-auto-complete-config",
        "--backend-config=python,shm-region-prefix-name=prefix0_", ":",
        "-n", "1", "tritonserver", *common, "--model-control-mode=explicit", "--load-model=mistral-small-engine",
        "--disable-auto-complete-config", "--backend-config=python,shm-region-prefix-name=prefix1_",
    ]
    assert shlex.join(launch) in capsys.readouterr().out
    single = fake_build(monkeypatch, tmp_path, fake_tools, mistral_ckpt, tmp_path / "mistral-tp1")
    with pytest.raises(RepositoryError, match=r"different world sizes \(mistral-small: 2, mistral-tiny: 1\)"):
        render_repository(tmp_path / "repo2", [
            ChatEndpoint("mistral-small", tiny_mixtral_dir, engine="tensorrtllm", engine_dir=engine, max_batch_size=8),
            ChatEndpoint("mistral-tiny", tiny_mistral_dir, engine="tensorrtllm", engine_dir=single, max_batch_size=8),
        ])


def test_profiles_cover_the_endpoints():
    assert set(PROFILES) == {"mistral-tiny", "mistral-small", "mistral-medium"}
    assert BuildProfile("x").max_seq_len == 8192
