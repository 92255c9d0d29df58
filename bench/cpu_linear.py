"""CPU benchmark of the bfloat16 linear kernel (python_backend/model/cpu_kernels.c) against oneDNN.

    python bench/cpu_linear.py             # SmolLM2-135M's linears (the demo model), 1..256 rows
    python bench/cpu_linear.py --record    # and append the figures to bench/RESULTS.md
    ONEDNN_MAX_CPU_ISA=AVX2 python bench/cpu_linear.py --march x86-64-v3   # as on an AVX2 CPU

Both run the demo model's own weights: every dense layer's fused q/k/v, output, fused gate/up and
down projections in turn (as a step does, so the weights come from memory, not from cache), then
the output projection. The baseline is oneDNN's prepacked matmul, the path the model takes
without the kernel: in bfloat16 where the CPU multiplies it natively (AVX512-BF16, AMX), in float32
elsewhere (where dtype auto would pick float32 without the kernel, torch's bf16 matmuls being slower
there). For each row count it prints the median of the runs, alternated, and the ratio.
Needs a CPU with AVX512F (where the kernel is built).
"""
from __future__ import annotations

import argparse
import os
import shlex
import datetime
import statistics
import sys
import time

import torch

from plateforme.builders.assets import prepare_assets
from plateforme.python_backend.model import cpu_kernels, load_model
from plateforme.python_backend.model.cpu_kernels import native_bf16
from plateforme.python_backend.model.packing import PackedWeight

# bench/results.py: bench/ is on sys.path when this file runs as a script.
from results import RESULTS, cpu_facts, record

SECTION = "## bfloat16 linear kernel on CPU (bench/cpu_linear.py)"
ROWS = (1, 4, 16, 64, 256)


def layer_weights(model) -> tuple[list[torch.Tensor], torch.Tensor]:
    weights = []
    for layer in model.layers:
        attention, ffn = layer.attention, layer.feed_forward
        weights += [attention.wqkv, attention.wo.weight, ffn.w13, ffn.w2.weight]
    return weights, model.output.weight


def time_pass(linears, head, inputs, head_input) -> tuple[float, float]:
    """Seconds for every layer's linears in turn, and for the output projection."""
    start = time.perf_counter()
    for linear, x in zip(linears, inputs):
        linear(x)
    middle = time.perf_counter()
    head(head_input)
    return middle - start, time.perf_counter() - middle


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=7, help="alternated runs per row count (median)")
    parser.add_argument("--march", default="native",
                        help="build the kernels for this instruction set (cc -march), e.g. x86-64-v3 for AVX2")
    parser.add_argument("--record", action="store_true", help="append the figures to bench/RESULTS.md")
    args = parser.parse_args()
    kernels = cpu_kernels.build(args.march)
    if not kernels.has_linear:
        print(f"the linear kernel is built only for AVX512F or AVX2 (-march={args.march})", file=sys.stderr)
        return 1
    model_dir = prepare_assets(names=["smollm2-mistral"], progress=False)["smollm2-mistral"]
    model = load_model(model_dir, dtype=torch.bfloat16)
    weights, output = layer_weights(model)
    base_dtype = torch.bfloat16 if native_bf16() else torch.float32
    paths = {
        "oneDNN": ([PackedWeight(w.to(base_dtype)) for w in weights], PackedWeight(output.to(base_dtype))),
        "kernel": ([kernels.blocked_weight(w) for w in weights], kernels.blocked_weight(output)),
    }
    if any(w is None for w in paths["kernel"][0]) or paths["kernel"][1] is None:
        print("some weight shape is not a multiple of the kernel's blocks", file=sys.stderr)
        return 1
    threads = torch.get_num_threads()
    cpu_model, flags = cpu_facts()
    base_name = str(base_dtype).removeprefix("torch.")
    lines = [
        f"- command: `{shlex.join(['python', 'bench/cpu_linear.py', *sys.argv[1:]])}`; {threads} torch threads, "
        f"torch {torch.__version__}",
        f"- machine: {cpu_model} ({flags}); oneDNN runs {base_name} (the model's path without the kernel here)"
        f"{', limited to ' + os.environ['ONEDNN_MAX_CPU_ISA'] if os.environ.get('ONEDNN_MAX_CPU_ISA') else ''}; "
        f"kernels built with -march={args.march}",
        f"- weights: {len(weights)} linears of {model.args.n_layers} layers "
        f"({sum(w.numel() for w in weights) * 2 / 2**20:.0f} MiB) and the output projection "
        f"({output.numel() * 2 / 2**20:.0f} MiB), bfloat16; median of {args.repeats} alternated runs",
        "",
        f"| rows | layers: oneDNN {base_name} | layers: kernel | ratio | output proj.: oneDNN | kernel | ratio |",
        "|---|---|---|---|---|---|---|",
    ]
    print("\n".join(lines), flush=True)
    generator = torch.Generator().manual_seed(0)
    with torch.inference_mode():
        for rows in ROWS:
            inputs = [torch.randn(rows, w.shape[1], generator=generator).to(torch.bfloat16) for w in weights]
            head_input = torch.randn(rows, output.shape[1], generator=generator).to(torch.bfloat16)
            dtypes = {"oneDNN": base_dtype, "kernel": torch.bfloat16}
            typed = {name: ([x.to(dtype) for x in inputs], head_input.to(dtype)) for name, dtype in dtypes.items()}
            times = {name: ([], []) for name in paths}
            for name, (linears, head) in paths.items():  # warm-up
                time_pass(linears, head, *typed[name])
            for _ in range(args.repeats):
                for name, (linears, head) in paths.items():
                    layers_s, head_s = time_pass(linears, head, *typed[name])
                    times[name][0].append(layers_s)
                    times[name][1].append(head_s)
            (base_layers, base_head), (ours_layers, ours_head) = (
                tuple(statistics.median(t) * 1e3 for t in times[name]) for name in paths)
            line = (f"| {rows} | {base_layers:.2f} ms | {ours_layers:.2f} ms | {base_layers / ours_layers:.2f}x "
                    f"| {base_head:.2f} ms | {ours_head:.2f} ms | {base_head / ours_head:.2f}x |")
            print(line, flush=True)
            lines.append(line)
    if args.record:
        record(SECTION, "python bench/cpu_linear.py --record", f"### {datetime.date.today().isoformat()}", lines)
        print(f"recorded in {RESULTS}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
