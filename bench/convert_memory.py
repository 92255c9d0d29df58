"""Peak memory of `plateforme convert` on a synthetic Mixtral-shaped checkpoint of several GB.

Writes a random bf16 checkpoint with Mixtral 8x7B's shapes (hidden 4096, intermediate 14336,
8 experts, 32 heads / 8 KV heads, vocabulary 32000; fewer layers), sharded like Hugging Face's
(`model-0000N-of-0000M.safetensors` + index), converts it with the real CLI in a child process,
and reports the child's peak RSS (from wait4) against the checkpoint's size, then spot-checks the
layout of the written rank files against the source.

    python bench/convert_memory.py                      # 2 layers: a 6.2 GB checkpoint
    python bench/convert_memory.py --layers 4 --record  # and append the figures to bench/RESULTS.md
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shlex
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors import safe_open

from results import RESULTS, record

from plateforme.builders.convert import OutputTensor, SafetensorsWriter
from plateforme.builders.mapping import Mapping

HIDDEN, INTER, EXPERTS, HEADS, KV_HEADS, VOCAB = 4096, 14336, 8, 32, 8, 32000
SHARD_BYTES = 2 << 30


def source_tensors(layers: int) -> list[tuple[str, tuple[int, ...]]]:
    head = HIDDEN // HEADS
    tensors = [("model.embed_tokens.weight", (VOCAB, HIDDEN))]
    for i in range(layers):
        p = f"model.layers.{i}."
        tensors += [
            (p + "input_layernorm.weight", (HIDDEN,)),
            (p + "self_attn.q_proj.weight", (HEADS * head, HIDDEN)),
            (p + "self_attn.k_proj.weight", (KV_HEADS * head, HIDDEN)),
            (p + "self_attn.v_proj.weight", (KV_HEADS * head, HIDDEN)),
            (p + "self_attn.o_proj.weight", (HIDDEN, HEADS * head)),
            (p + "post_attention_layernorm.weight", (HIDDEN,)),
            (p + "block_sparse_moe.gate.weight", (EXPERTS, HIDDEN)),
        ]
        for e in range(EXPERTS):
            x = f"{p}block_sparse_moe.experts.{e}."
            tensors += [(x + "w1.weight", (INTER, HIDDEN)), (x + "w2.weight", (HIDDEN, INTER)),
                        (x + "w3.weight", (INTER, HIDDEN))]
    tensors += [("model.norm.weight", (HIDDEN,)), ("lm_head.weight", (VOCAB, HIDDEN))]
    return tensors


def random_chunks(shape: tuple[int, ...], generator: torch.Generator) -> Iterator[torch.Tensor]:
    """A random bf16 tensor of `shape`, 16 MB of rows at a time."""
    rows, width = shape[0], (shape[1] if len(shape) > 1 else 1)
    step = max(1, (16 << 20) // (width * 4))
    for start in range(0, rows, step):
        chunk = torch.randn((min(step, rows - start), width), generator=generator) * 0.02
        yield (chunk.flatten() if len(shape) == 1 else chunk).to(torch.bfloat16)


def write_source(out: Path, layers: int) -> int:
    """A sharded random checkpoint, written chunk by chunk (its own memory stays small too)."""
    out.mkdir(parents=True)
    (out / "config.json").write_text(json.dumps({
        "architectures": ["MixtralForCausalLM"], "model_type": "mixtral", "vocab_size": VOCAB,
        "hidden_size": HIDDEN, "intermediate_size": INTER, "num_hidden_layers": layers,
        "num_attention_heads": HEADS, "num_key_value_heads": KV_HEADS, "num_local_experts": EXPERTS,
        "num_experts_per_tok": 2, "max_position_embeddings": 32768, "rope_theta": 1e6, "rms_norm_eps": 1e-5,
        "sliding_window": None, "tie_word_embeddings": False, "torch_dtype": "bfloat16",
    }, indent=2))
    shards: list[list[OutputTensor]] = [[]]
    size = 0
    for name, shape in source_tensors(layers):
        tensor = OutputTensor(name, torch.bfloat16, shape, [])
        if size + tensor.nbytes > SHARD_BYTES and shards[-1]:
            shards.append([])
            size = 0
        shards[-1].append(tensor)
        size += tensor.nbytes
    generator = torch.Generator().manual_seed(0)
    weight_map, total = {}, 0
    for index, shard in enumerate(shards):
        name = f"model-{index + 1:05d}-of-{len(shards):05d}.safetensors"
        writer = SafetensorsWriter(out / name, shard)
        for tensor in shard:
            writer.write_tensor(tensor.name, random_chunks(tensor.shape, generator))
            weight_map[tensor.name] = name
        writer.close()
        total += writer.size
    (out / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    return total


# Runs the CLI (or only its conversion imports) and writes the process's peak RSS (VmHWM) to argv[1].
# getrusage's ru_maxrss would not do: Linux carries the parent's RSS at fork into the child's figure.
MEASURED_CHILD = """
import atexit, sys
out = sys.argv.pop(1)

def peak():
    with open("/proc/self/status") as status:
        kb = next(int(line.split()[1]) for line in status if line.startswith("VmHWM:"))
    with open(out, "w") as handle:
        handle.write(str(kb * 1024))

atexit.register(peak)
if sys.argv[1:] == ["--imports-only"]:
    import plateforme.builders.convert, plateforme.cli
else:
    from plateforme.cli import main
    raise SystemExit(main(sys.argv[1:]))
"""


def run_measured(args: list[str], work: Path) -> tuple[int, float, int]:
    """(exit status, wall seconds, peak RSS bytes) of `plateforme ARGS` in a child process."""
    report = work / "peak-rss"
    start = time.perf_counter()
    status = subprocess.run([sys.executable, "-c", MEASURED_CHILD, str(report), *args]).returncode
    return status, time.perf_counter() - start, int(report.read_text())


def spot_check(source: Path, checkpoint: Path, mapping: Mapping, layers: int) -> int:
    """Compare slices of the rank files with the source tensors they come from; returns checks made."""
    index = json.loads((source / "model.safetensors.index.json").read_text())["weight_map"]

    def read(name: str, rows: slice, cols: slice | None = None) -> torch.Tensor:
        with safe_open(source / index[name], framework="pt") as handle:
            part = handle.get_slice(name)
            return part[rows] if cols is None else part[rows, cols]

    checks = 0
    inter_local = INTER // mapping.moe_tp_size
    for rank in range(mapping.world_size):
        pos = mapping.position(rank)
        with safe_open(checkpoint / f"rank{rank}.safetensors", framework="pt") as handle:
            for local, layer in enumerate(mapping.pp_layers(layers, pos.pp_rank)):
                fc = handle.get_slice(f"transformer.layers.{local}.mlp.fc.weight")
                proj = handle.get_slice(f"transformer.layers.{local}.mlp.proj.weight")
                for j, expert in enumerate(mapping.ep_experts(EXPERTS, pos.moe_ep_rank)):
                    x = f"model.layers.{layer}.block_sparse_moe.experts.{expert}."
                    first = pos.moe_tp_rank * inter_local
                    rows = slice(first, first + 4)
                    assert torch.equal(fc[j:j + 1, 0:4][0], read(x + "w3.weight", rows))
                    assert torch.equal(fc[j:j + 1, inter_local:inter_local + 4][0], read(x + "w1.weight", rows))
                    assert torch.equal(proj[j:j + 1, 0:4, 0:8][0], read(x + "w2.weight", slice(0, 4),
                                                                       slice(first, first + 8)))
                    checks += 3
    return checks


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work", type=Path, default=Path("/tmp/plateforme-convert-memory"))
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--tp", type=int, default=2)
    parser.add_argument("--moe-ep", type=int, default=2)
    parser.add_argument("--record", action="store_true", help="append the figures to bench/RESULTS.md")
    parser.add_argument("--keep", action="store_true", help="keep the synthetic and converted checkpoints")
    args = parser.parse_args()

    shutil.rmtree(args.work, ignore_errors=True)
    source, checkpoint = args.work / "hf", args.work / "trtllm"
    start = time.perf_counter()
    size = write_source(source, args.layers)
    print(f"synthetic checkpoint: {size / 1e9:.2f} GB in {time.perf_counter() - start:.0f} s", flush=True)

    command = ["convert", str(source), str(checkpoint), "--dtype", "bfloat16", "--tp", str(args.tp),
               "--moe-ep", str(args.moe_ep), "--quiet"]
    status, seconds, peak = run_measured(command, args.work)
    if status:
        print(f"conversion failed with exit status {status}", file=sys.stderr)
        return 1
    _, _, baseline = run_measured(["--imports-only"], args.work)
    written = sum(p.stat().st_size for p in checkpoint.iterdir())
    mapping = Mapping.create(args.tp, moe_ep=args.moe_ep)
    checks = spot_check(source, checkpoint, mapping, args.layers)
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")

    lines = [
        f"- bench: `{shlex.join(['python', 'bench/convert_memory.py', *sys.argv[1:]])}`; conversion: "
        f"`{shlex.join(['plateforme', *command])}`",
        f"- source: {size / 1e9:.2f} GB bf16, Mixtral 8x7B shapes with {args.layers} layers "
        f"({len(list(source.glob('*.safetensors')))} shards); written: {written / 1e9:.2f} GB in "
        f"{mapping.world_size} rank files",
        f"- peak RSS (VmHWM) of the conversion process: {peak / 1e6:.0f} MB, {peak / size:.1%} of the "
        f"checkpoint; the same interpreter with the same imports and no conversion: {baseline / 1e6:.0f} MB",
        f"- wall time {seconds:.0f} s ({size / seconds / 1e6:.0f} MB/s); layout spot checks passed: {checks}",
        f"- machine: {os.cpu_count()} cores, {memory / 2**30:.0f} GiB RAM, {platform.platform()}, "
        f"torch {torch.__version__}",
    ]
    print("\n".join(lines))
    if args.record:
        record("## Checkpoint conversion memory", "python bench/convert_memory.py --record",
               f"### {datetime.date.today().isoformat()}, {args.layers} layers, tp {args.tp} moe_ep {args.moe_ep}",
               lines)
        print(f"recorded in {RESULTS}")
    if not args.keep:
        shutil.rmtree(args.work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
