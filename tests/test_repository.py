"""Rendering model repositories and the fill_template tool (no server needed)."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest

from plateforme.builders.fill_template import TemplateError, fill_template, parse_substitutions
from plateforme.builders.repository import (
    ChatEndpoint,
    EmbeddingEndpoint,
    RepositoryError,
    render_repository,
    templates_root,
)


def test_parse_substitutions_follows_upstream_escaping():
    values = parse_substitutions(r"engine_dir:/models/a\,b,tokenizer_dir:/t,url:http\://x")
    assert values == {"engine_dir": "/models/a,b", "tokenizer_dir": "/t", "url": "http://x"}
    with pytest.raises(TemplateError, match="key:value"):
        parse_substitutions("novalue")


def test_fill_template_rejects_unknown_keys_and_keeps_unset_placeholders():
    text = 'name: "${model_name}"\nkey: "${engine_dir}"\nqueue: ${max_queue_delay_microseconds}'
    filled = fill_template(text, {"model_name": "m"})
    assert 'name: "m"' in filled and "${engine_dir}" in filled and "queue: 0" in filled
    with pytest.raises(TemplateError, match="nope"):
        fill_template(text, {"nope": 1})


def test_fill_template_cli_in_place(tmp_path):
    template = tmp_path / "config.pbtxt"
    template.write_text((templates_root() / "preprocessing" / "config.pbtxt").read_text())
    template.chmod(0o644)
    result = subprocess.run(
        [sys.executable, "-m", "plateforme.builders.fill_template", "-i", str(template),
         "model_name:pre,triton_max_batch_size:8,tokenizer_dir:/tok,preprocessing_instance_count:1"],
        capture_output=True, text=True,
    )
    assert result.returncode == 0, result.stderr
    text = template.read_text()
    assert 'name: "pre"' in text and "max_batch_size: 8" in text and 'string_value: "/tok"' in text
    assert template.stat().st_mode & 0o777 == 0o644  # still readable by a server running as another user


def test_render_repository_layout(tmp_path, tiny_mistral_dir, tiny_mixtral_dir, demo_assets):
    out = render_repository(
        tmp_path / "repo",
        chat=[ChatEndpoint("mistral-tiny", tiny_mistral_dir), ChatEndpoint("mistral-small", tiny_mixtral_dir)],
        embeddings=[EmbeddingEndpoint("mistral-embed", demo_assets["minilm-embed"])],
    )
    models = sorted(p.name for p in out.iterdir() if p.is_dir())
    assert models == sorted([
        "mistral-embed",
        *[f"mistral-{size}{suffix}" for size in ("tiny", "small")
          for suffix in ("", "-preprocessing", "-engine", "-postprocessing", "-bls")],
    ])
    for model in models:
        config = (out / model / "config.pbtxt").read_text()
        assert f'name: "{model}"' in config
        # Every numeric placeholder is filled; only none remain in python-backend models.
        assert "${" not in config, (model, config)
    ensemble = (out / "mistral-tiny" / "config.pbtxt").read_text()
    for step in ("mistral-tiny-preprocessing", "mistral-tiny-engine", "mistral-tiny-postprocessing"):
        assert f'model_name: "{step}"' in ensemble
    assert 'key: "PREFIX_IDS"' in ensemble
    engine_config = (out / "mistral-tiny-engine" / "config.pbtxt").read_text()
    assert 'key: "separate_prefill" value: { string_value: "auto" }' in engine_config
    model_py = (out / "mistral-tiny-engine" / "1" / "model.py").read_text()
    assert "from plateforme.python_backend.triton.engine import TritonPythonModel" in model_py
    manifest = json.loads((out / "plateforme.json").read_text())
    assert set(manifest["chat"]) == {"mistral-tiny", "mistral-small"}
    # Told to clients: the v3 tokenizer encodes tools, the v1 one does not.
    assert 'key: "function_calling" value: { string_value: "true" }' in ensemble
    small = (out / "mistral-small" / "config.pbtxt").read_text()
    assert 'key: "function_calling" value: { string_value: "false" }' in small


def test_a_tokenizer_that_does_not_load_is_refused_at_render(tmp_path, tiny_mistral_dir):
    broken = tmp_path / "broken"
    shutil.copytree(tiny_mistral_dir, broken)
    (broken / "tokenizer.model.v3").write_bytes(b"not a sentencepiece model")
    with pytest.raises(RepositoryError, match=r"m: the tokenizer in .*broken cannot be loaded \(RuntimeError: .*parse"):
        render_repository(tmp_path / "repo", chat=[ChatEndpoint("m", broken)])
    assert not (tmp_path / "repo").exists()


def test_render_tensorrtllm_engine_variant(tmp_path, tiny_mistral_dir):
    engine_dir = tmp_path / "engine"
    engine_dir.mkdir()
    # What trtllm-build writes beside the engines (the render checks the engine's vocabulary).
    (engine_dir / "config.json").write_text(json.dumps(
        {"version": "0.99.0", "pretrained_config": {"vocab_size": 32768, "mapping": {"world_size": 1}},
         "build_config": {"max_batch_size": 64, "max_seq_len": 256}}))
    (engine_dir / "rank0.engine").write_bytes(b"")
    out = render_repository(tmp_path / "repo", chat=[
        ChatEndpoint("mistral-tiny", tiny_mistral_dir, engine="tensorrtllm", engine_dir=engine_dir,
                     max_attention_window_size=4096),
    ])
    config = (out / "mistral-tiny-engine" / "config.pbtxt").read_text()
    assert 'backend: "tensorrtllm"' in config
    assert f'key: "gpt_model_path" value: {{ string_value: "{engine_dir}" }}' in config
    assert 'string_value: "inflight_fused_batching"' in config
    assert 'key: "max_attention_window_size" value: { string_value: "4096" }' in config
    assert "decoupled: true" in config
    assert not (out / "mistral-tiny-engine" / "1" / "model.py").exists()
    ensemble = (out / "mistral-tiny" / "config.pbtxt").read_text()
    assert "PREFIX_IDS" not in ensemble and "finish_reason" not in ensemble


@pytest.mark.parametrize("make_endpoint,message", [
    (lambda d, t: ChatEndpoint("bad name!", d), "not a valid Triton model name"),
    (lambda d, t: ChatEndpoint("m", t), "no config.json"),
    (lambda d, t: ChatEndpoint("m", d, engine="tensorrtllm"), "engine directory"),
    (lambda d, t: ChatEndpoint("m", d, separate_prefill="yes"), "separate_prefill must be one of"),
    (lambda d, t: ChatEndpoint("m", d, batch_scheduler_policy="fifo"), "batch_scheduler_policy must be one of"),
    (lambda d, t: ChatEndpoint("m", d, max_batch_size=0), "max_batch_size must be an integer >= 1, got 0"),
    (lambda d, t: ChatEndpoint("m", d, max_num_tokens=0), "max_num_tokens must be an integer >= 1"),
    (lambda d, t: ChatEndpoint("m", d, max_seq_len=-5), "max_seq_len must be an integer >= 0, got -5"),
    (lambda d, t: ChatEndpoint("m", d, max_seq_len=100000), "max_seq_len 100000 exceeds the model's context of 256"),
])
def test_render_errors_are_clear(tmp_path, tiny_mistral_dir, make_endpoint, message):
    with pytest.raises(RepositoryError, match=message):
        render_repository(tmp_path / "repo", chat=[make_endpoint(tiny_mistral_dir, tmp_path)])
    assert not (tmp_path / "repo").exists()


def test_cli_refuses_an_endpoint_named_twice(tmp_path, tiny_mistral_dir, tiny_mixtral_dir, capsys):
    from plateforme.cli import main

    args = ["repo", "--out", str(tmp_path / "repo"), "--endpoint", f"m={tiny_mistral_dir}",
            "--endpoint", f"m={tiny_mixtral_dir}"]
    assert main(args) == 2
    assert "--endpoint m is given twice" in capsys.readouterr().err and not (tmp_path / "repo").exists()


def test_cli_sets_the_engine_queue_limits(tmp_path, tiny_mistral_dir):
    from plateforme.cli import main

    assert main(["repo", "--out", str(tmp_path / "repo"), "--endpoint", f"m={tiny_mistral_dir}",
                 "--max-queue-size", "3", "--max-queue-delay-ms", "250", "--quiet"]) == 0
    config = (tmp_path / "repo" / "m-engine" / "config.pbtxt").read_text()
    assert 'key: "max_queue_size" value: { string_value: "3" }' in config
    assert 'key: "max_queue_delay_ms" value: { string_value: "250" }' in config


def test_a_repository_renders_again_in_place(tmp_path, tiny_mistral_dir, tiny_mixtral_dir):
    out = render_repository(tmp_path / "repo", chat=[ChatEndpoint("mistral-tiny", tiny_mistral_dir)])
    render_repository(out, chat=[ChatEndpoint("mistral-small", tiny_mixtral_dir)])
    assert sorted(p.name for p in out.iterdir()) == sorted(
        ["plateforme.json"] + [f"mistral-small{part}" for part in ("", "-preprocessing", "-engine", "-postprocessing",
                                                                   "-bls")])


def test_an_embedding_endpoint_needs_an_encoder_with_weights(tmp_path, tiny_mistral_dir, demo_assets):
    with pytest.raises(RepositoryError, match="is a causal language model .*MistralForCausalLM"):
        render_repository(tmp_path / "repo", [], [EmbeddingEndpoint("e", tiny_mistral_dir)])
    no_weights = tmp_path / "no-weights"
    no_weights.mkdir()
    (no_weights / "config.json").write_text((demo_assets["minilm-embed"] / "config.json").read_text())
    with pytest.raises(RepositoryError, match="holds no weights"):
        render_repository(tmp_path / "repo", [], [EmbeddingEndpoint("e", no_weights)])
    assert not (tmp_path / "repo").exists()


def test_failed_render_keeps_the_previous_repository(tmp_path, tiny_mistral_dir):
    out = render_repository(tmp_path / "repo", chat=[ChatEndpoint("mistral-tiny", tiny_mistral_dir)])
    before = sorted(p.name for p in out.iterdir())
    with pytest.raises(RepositoryError):
        render_repository(out, chat=[ChatEndpoint("a", tiny_mistral_dir), ChatEndpoint("a", tiny_mistral_dir)])
    assert sorted(p.name for p in out.iterdir()) == before
    assert [p.name for p in tmp_path.iterdir()] == ["repo"]  # no partial directories left
