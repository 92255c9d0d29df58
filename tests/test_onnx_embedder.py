"""The embedding endpoint's ONNX path on the real all-MiniLM-L6-v2 asset: export, polygraphy checks,
ONNX Runtime against PyTorch, a real tritonserver serving both runtimes, and the TensorRT plan's refusal."""
from __future__ import annotations

import importlib.util
import json
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest

pytest.importorskip("onnxruntime")
pytest.importorskip("polygraphy")
onnx = pytest.importorskip("onnx")

from plateforme.builders.onnx_embedder import (  # noqa: E402
    CHECK_ATOL,
    OnnxCheckError,
    OnnxExportError,
    PlanProfile,
    TensorRTUnavailableError,
    build_tensorrt_plan,
    check_embedder_onnx,
    export_embedder_onnx,
)
from plateforme.builders.repository import EmbeddingEndpoint, RepositoryError, render_repository  # noqa: E402
from plateforme.python_backend.embeddings import Embedder, OnnxEmbedder  # noqa: E402

SENTENCES = [
    "A man is playing a guitar.",
    "Someone plays an instrument.",
    "The stock market fell sharply today.",
    "Le chat dort sur le canapé.",
    "深度学习模型把文本映射为向量。",
    "tokens " * 300,  # truncated at the model's 256 tokens
    "x",
]


@pytest.fixture(scope="module")
def minilm_dir(demo_assets):
    return demo_assets["minilm-embed"]


@pytest.fixture(scope="module")
def exported(tmp_path_factory, minilm_dir):
    return export_embedder_onnx(minilm_dir, tmp_path_factory.mktemp("onnx") / "minilm-onnx")


@pytest.fixture(scope="module")
def torch_embedder(minilm_dir):
    return Embedder(minilm_dir)


def test_export_layout_and_dynamic_axes(exported, minilm_dir):
    out_dir = exported.parent
    assert exported.name == "model.onnx" and exported.stat().st_size > 80e6  # 22.7M float32 weights inside
    for name in ("embedder.json", "tokenizer.json", "vocab.txt", "tokenizer_config.json", "1_Pooling/config.json"):
        assert (out_dir / name).is_file(), name
    manifest = json.loads((out_dir / "embedder.json").read_text())
    assert (manifest["dim"], manifest["max_tokens"], manifest["pooling"], manifest["normalization"]) == (
        384, 256, "mean", "l2")
    assert not list(out_dir.parent.glob(".minilm-onnx.partial-*"))  # the atomic write left nothing behind
    graph = onnx.load(str(exported), load_external_data=False).graph
    shapes = {v.name: [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim]
              for v in list(graph.input) + list(graph.output)}
    assert shapes == {"input_ids": ["batch", "sequence"], "attention_mask": ["batch", "sequence"],
                      "embedding": ["batch", 384]}


def test_polygraphy_check_passes_with_figures(exported, minilm_dir):
    check = check_embedder_onnx(exported, minilm_dir)
    assert check.atol == CHECK_ATOL and check.cases == 4 and check.max_sequence == 256
    # float32 ONNX Runtime vs float32 PyTorch: rounding-level differences only
    assert check.max_abs_diff < 1e-5, check
    assert check.min_cosine > 0.99999, check
    assert check.lint_nodes_passing > 100  # polygraphy linted the graph node by node
    assert check.opset == 17


def test_check_refuses_truncated_file(exported, minilm_dir, tmp_path):
    broken = tmp_path / "model.onnx"
    broken.write_bytes(exported.read_bytes()[: 1_000_000])
    with pytest.raises(OnnxCheckError, match="not a readable ONNX model"):
        check_embedder_onnx(broken, minilm_dir)
    with pytest.raises(OnnxCheckError, match="does not exist"):
        check_embedder_onnx(tmp_path / "missing.onnx", minilm_dir)


def _with_output_altered(source, target, scale: float) -> None:
    """A copy of the graph whose `embedding` output is the original one times `scale`."""
    model = onnx.load(str(source))
    graph = model.graph
    producer = next(node for node in graph.node if "embedding" in node.output)
    producer.output[list(producer.output).index("embedding")] = "embedding_before_scale"
    graph.initializer.append(onnx.numpy_helper.from_array(np.array(scale, dtype=np.float32), "scale"))
    graph.node.append(onnx.helper.make_node("Mul", ["embedding_before_scale", "scale"], ["embedding"]))
    onnx.save(model, str(target))


def test_check_refuses_altered_output(exported, minilm_dir, tmp_path):
    altered = tmp_path / "model.onnx"
    _with_output_altered(exported, altered, 1.01)  # 1% longer vectors: same directions, wrong values
    with pytest.raises(OnnxCheckError, match=r"disagrees with PyTorch.*max \|diff\|"):
        check_embedder_onnx(altered, minilm_dir)


def test_check_refuses_other_inputs(exported, minilm_dir, tmp_path):
    model = onnx.load(str(exported))
    renamed = model.graph.input[1].name
    model.graph.input[1].name = "mask"
    for node in model.graph.node:
        for index, name in enumerate(node.input):
            if name == renamed:
                node.input[index] = "mask"
    onnx.save(model, str(tmp_path / "model.onnx"))
    with pytest.raises(OnnxCheckError, match="expected inputs"):
        check_embedder_onnx(tmp_path / "model.onnx", minilm_dir)


def test_onnxruntime_matches_pytorch_embedder(exported, torch_embedder):
    onnx_embedder = OnnxEmbedder(exported.parent, batch_size=4)  # several batches, each padded its own way
    assert onnx_embedder.providers[-1] == "CPUExecutionProvider"
    got, got_counts = onnx_embedder.embed(SENTENCES)
    want, want_counts = torch_embedder.embed(SENTENCES)
    assert got.shape == want.shape == (len(SENTENCES), 384) and got.dtype == np.float32
    assert got_counts == want_counts and max(got_counts) == 256
    assert float(np.abs(got - want).max()) < 1e-5
    cosines = (got * want).sum(axis=1)  # unit vectors
    assert float(cosines.min()) > 0.99999
    # the vectors still mean something: paraphrases close, unrelated texts apart
    assert got[0] @ got[1] > 0.5 > got[0] @ got[2]


def test_onnx_embedder_refuses_other_directories(tmp_path, minilm_dir):
    with pytest.raises(ValueError, match="not an exported ONNX embedder"):
        OnnxEmbedder(minilm_dir)
    (tmp_path / "embedder.json").write_text("{")
    with pytest.raises(ValueError, match="not valid JSON"):
        OnnxEmbedder(tmp_path)


def test_export_refuses_non_bert_and_missing_dirs(tiny_mistral_dir, tmp_path):
    with pytest.raises(OnnxExportError, match="BERT"):
        export_embedder_onnx(tiny_mistral_dir, tmp_path / "out")
    with pytest.raises(OnnxExportError, match="not a directory"):
        export_embedder_onnx(tmp_path / "nowhere", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_export_never_replaces_other_directories(minilm_dir, tmp_path):
    with pytest.raises(OnnxExportError, match="an input of this run"):
        export_embedder_onnx(minilm_dir, minilm_dir)
    with pytest.raises(OnnxExportError, match="an input of this run"):
        export_embedder_onnx(minilm_dir, minilm_dir.parent)
    (tmp_path / "work").mkdir()
    (tmp_path / "work" / "notes.txt").write_text("keep me")
    with pytest.raises(OnnxExportError, match="not empty"):
        export_embedder_onnx(minilm_dir, tmp_path / "work")
    assert (tmp_path / "work" / "notes.txt").read_text() == "keep me"
    assert (minilm_dir / "model.safetensors").is_file()


@pytest.mark.skipif(importlib.util.find_spec("tensorrt") is not None, reason="TensorRT is installed here")
def test_tensorrt_plan_without_tensorrt_is_a_clear_error(exported, tmp_path):
    plan = tmp_path / "plans" / "model.plan"
    with pytest.raises(TensorRTUnavailableError, match="TensorRT is not installed"):
        build_tensorrt_plan(exported, plan)
    assert not plan.parent.exists() or not any(plan.parent.iterdir())
    with pytest.raises(ValueError, match="1 <= min <= opt <= max"):
        build_tensorrt_plan(exported, plan, PlanProfile(opt_batch=64, max_batch=32))
    with pytest.raises(FileNotFoundError):
        build_tensorrt_plan(tmp_path / "missing.onnx", plan)


def test_render_onnx_runtime(exported, minilm_dir, tmp_path):
    with pytest.raises(RepositoryError, match="needs onnx_path"):
        render_repository(tmp_path / "a", [], [EmbeddingEndpoint("e", minilm_dir, runtime="onnx")])
    with pytest.raises(RepositoryError, match="runtime must be one of"):
        render_repository(tmp_path / "a", [], [EmbeddingEndpoint("e", minilm_dir, runtime="tensorrt")])
    with pytest.raises(RepositoryError, match="not an exported ONNX embedder"):
        render_repository(tmp_path / "a", [], [EmbeddingEndpoint("e", minilm_dir, runtime="onnx",
                                                                 onnx_path=minilm_dir)])
    assert not (tmp_path / "a").exists()
    repository = render_repository(tmp_path / "b", [], [
        EmbeddingEndpoint("e", minilm_dir, runtime="onnx", onnx_path=exported)])
    config = (repository / "e" / "config.pbtxt").read_text()
    assert 'key: "runtime" value: { string_value: "onnx" }' in config
    assert 'key: "onnx_dir" value: { string_value: "onnx" }' in config
    copied = repository / "e" / "1" / "onnx"
    assert (copied / "model.onnx").read_bytes() == exported.read_bytes()
    assert (copied / "embedder.json").is_file() and (copied / "tokenizer.json").is_file()


def test_repo_command_serves_an_export_with_onnx_runtime(exported, minilm_dir, tmp_path):
    """`plateforme repo --embedding NAME=DIR`: an export-embedder output runs on ONNX Runtime, a
    checkpoint on PyTorch."""
    result = subprocess.run([sys.executable, "-m", "plateforme", "repo", "--out", str(tmp_path / "repo"),
                             "--embedding", f"embed-onnx={exported.parent}",
                             "--embedding", f"embed-torch={minilm_dir}"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert re.search(r"embedding\s+embed-onnx\s+onnx\s", result.stdout), result.stdout
    onnx_config = (tmp_path / "repo" / "embed-onnx" / "config.pbtxt").read_text()
    assert 'key: "runtime" value: { string_value: "onnx" }' in onnx_config
    assert (tmp_path / "repo" / "embed-onnx" / "1" / "onnx" / "model.onnx").is_file()
    torch_config = (tmp_path / "repo" / "embed-torch" / "config.pbtxt").read_text()
    assert 'key: "runtime" value: { string_value: "pytorch" }' in torch_config


@pytest.mark.server
def test_triton_serves_onnx_like_pytorch(exported, minilm_dir, tmp_path):
    """A real tritonserver with the same model under both runtimes: same tensors, same vectors."""
    import tritonclient.http as httpclient
    from tritonclient.utils import InferenceServerException

    from plateforme.clients import PlateformeClient
    from plateforme.server import ServerConfig, TritonServer, free_port

    shutil.copytree(exported.parent, tmp_path / "export")  # serving must not depend on the export dir
    repository = render_repository(tmp_path / "models", [], [
        EmbeddingEndpoint("embed-pytorch", minilm_dir, num_threads=1),
        EmbeddingEndpoint("embed-onnx", minilm_dir, runtime="onnx", onnx_path=tmp_path / "export", num_threads=1),
    ])
    shutil.rmtree(tmp_path / "export")
    config = ServerConfig(repository, http_port=free_port(), grpc_port=free_port(), metrics_port=free_port())
    with TritonServer(config) as server:
        texts = SENTENCES[:5]
        vectors = {}
        for model in ("embed-pytorch", "embed-onnx"):
            client = PlateformeClient(server.http_url, protocol="http")
            response = client.embeddings.create(model=model, inputs=texts)
            vectors[model] = np.array([item.embedding for item in response.data], dtype=np.float32)
            assert response.usage.prompt_tokens > len(texts)
        assert vectors["embed-onnx"].shape == (5, 384)
        assert float(np.abs(vectors["embed-onnx"] - vectors["embed-pytorch"]).max()) < 1e-5
        assert float((vectors["embed-onnx"] * vectors["embed-pytorch"]).sum(axis=1).min()) > 0.99999

        http = httpclient.InferenceServerClient(server.http_url)
        try:
            assert http.get_model_config("embed-onnx")["parameters"]["runtime"]["string_value"] == "onnx"
            tensor = httpclient.InferInput("text_input", [1, 1], "BYTES")
            tensor.set_data_from_numpy(np.array([[b"   "]], dtype=object))
            with pytest.raises(InferenceServerException, match="non-empty"):
                http.infer("embed-onnx", [tensor])
            assert http.is_model_ready("embed-onnx")  # a bad request leaves the model serving
        finally:
            http.close()


def test_cli_export_with_check_replaces_a_previous_export(exported, minilm_dir, tmp_path, capsys):
    from plateforme.cli import main

    previous = tmp_path / "minilm-onnx"
    shutil.copytree(exported.parent, previous)
    old_inode = (previous / "model.onnx").stat().st_ino
    assert main(["export-embedder", str(minilm_dir), str(previous), "--check"]) == 0
    out = capsys.readouterr().out
    assert "check passed: 11 texts in 4 batches (up to 256 tokens)" in out and "lowest cosine" in out
    assert (previous / "model.onnx").stat().st_ino != old_inode
    assert not list(tmp_path.glob(".minilm-onnx.*"))
    assert main(["export-embedder", str(tmp_path / "nowhere"), str(tmp_path / "out")]) == 2
    assert "is not a directory" in capsys.readouterr().err
