"""The PyTorch engine alone on CPU, bfloat16 against float32: what `--dtype auto` chooses between.

    python bench/cpu_dtype.py                  # the demo's dense and MoE models, this CPU's kernels
    python bench/cpu_dtype.py --record         # and append the figures to bench/RESULTS.md
    ONEDNN_MAX_CPU_ISA=AVX2 ATEN_CPU_CAPABILITY=avx2 python bench/cpu_dtype.py --march x86-64-v3
                                               # as on an AVX2 CPU (kernels, oneDNN and torch limited)

For each model both engines are loaded once and run in turns (so a busy host weighs on both
alike): 1 and 16 sequences of 40-token prompts, greedy, --new-tokens each. Prefill is the first
step (every prompt at once); decode is tokens/s over the steps after it. Medians of --repeats runs.
"""
from __future__ import annotations

import argparse
import datetime
import os
import shlex
import statistics
import sys
import time

import torch

from plateforme.builders.assets import prepare_assets
from plateforme.python_backend.engine import Engine
from plateforme.python_backend.model import cpu_kernels
from plateforme.python_backend.sampling import SamplingParams

# bench/results.py: bench/ is on sys.path when this file runs as a script.
from results import RESULTS, cpu_facts, record

SECTION = "## bfloat16 against float32 on CPU (bench/cpu_dtype.py)"
MODELS = ("smollm2-mistral", "smollm2-mixtral")
DTYPES = ("bfloat16", "float32")
PROMPT_TOKENS = 40


def run(engine: Engine, sequences: int, new_tokens: int, tag: str) -> tuple[float, float]:
    """Seconds of the prefill step, and decode tokens/s after it."""
    for i in range(sequences):
        prompt = list(range(100 + i, 100 + i + PROMPT_TOKENS))
        engine.add_request(f"{tag}-{i}", prompt, SamplingParams(max_tokens=new_tokens, temperature=0.0))
    start = time.perf_counter()
    engine.step()
    prefilled = time.perf_counter()
    generated = 0
    while engine.has_work():
        generated += sum(len(out.token_ids) for out in engine.step())
    return prefilled - start, generated / (time.perf_counter() - prefilled)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", action="append", choices=MODELS, help="a demo model (default: both)")
    parser.add_argument("--march", default="native",
                        help="build the kernels for this instruction set (cc -march), e.g. x86-64-v3 for AVX2")
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--record", action="store_true", help="append the figures to bench/RESULTS.md")
    args = parser.parse_args()
    kernels = cpu_kernels.build(args.march)
    cpu_kernels.load = lambda: kernels  # the engines below load the kernels built for --march
    limits = ", ".join(f"{name}={os.environ[name]}" for name in ("ONEDNN_MAX_CPU_ISA", "ATEN_CPU_CAPABILITY")
                       if name in os.environ)
    cpu_model, flags = cpu_facts()
    lines = [
        f"- command: `{shlex.join(['python', 'bench/cpu_dtype.py', *sys.argv[1:]])}`"
        + (f" with {limits}" if limits else ""),
        f"- machine: {cpu_model}, {os.cpu_count()} cores ({flags}); torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads; kernels built with -march={args.march} (linear kernel: "
        f"{'yes' if kernels.has_linear else 'no'})",
        f"- {PROMPT_TOKENS}-token prompts, greedy, {args.new_tokens} new tokens; median of {args.repeats} alternated runs",
        "",
        "| model | sequences | prefill bf16 | prefill fp32 | bf16 / fp32 time | decode bf16 | decode fp32 | bf16 / fp32 tok/s |",
        "|---|---|---|---|---|---|---|---|",
    ]
    print("\n".join(lines), flush=True)
    for name in args.model or MODELS:
        model_dir = prepare_assets(names=[name], progress=False)[name]
        engines = {dtype: Engine(model_dir, dtype=dtype, max_seq_len=512, max_batch_size=16) for dtype in DTYPES}
        for sequences in (1, 16):
            figures = {dtype: ([], []) for dtype in DTYPES}
            for dtype, engine in engines.items():
                run(engine, sequences, 4, f"warm-{dtype}")
            for r in range(args.repeats):
                for dtype, engine in engines.items():
                    prefill, decode = run(engine, sequences, args.new_tokens, f"{dtype}-{r}")
                    figures[dtype][0].append(prefill)
                    figures[dtype][1].append(decode)
            (bf_prefill, bf_decode), (fp_prefill, fp_decode) = (
                tuple(statistics.median(f) for f in figures[dtype]) for dtype in DTYPES)
            line = (f"| {name} | {sequences} | {bf_prefill * 1e3:.0f} ms | {fp_prefill * 1e3:.0f} ms | "
                    f"{bf_prefill / fp_prefill:.2f}x | {bf_decode:.1f} tok/s | {fp_decode:.1f} tok/s | "
                    f"{bf_decode / fp_decode:.2f}x |")
            print(line, flush=True)
            lines.append(line)
        del engines
    if args.record:
        record(SECTION, "python bench/cpu_dtype.py --record", f"### {datetime.date.today().isoformat()}", lines)
        print(f"recorded in {RESULTS}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
