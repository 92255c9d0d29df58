"""bench/RESULTS.md: each benchmark appends its runs to a section of its own."""
from __future__ import annotations

import platform
from pathlib import Path

from plateforme.python_backend.model.cpu_kernels import cpu_flags

RESULTS = Path(__file__).with_name("RESULTS.md")


def record(section: str, command: str, title: str, lines: list[str]) -> None:
    """Add an entry at the end of `section` (created, with `command`, if absent)."""
    text = RESULTS.read_text() if RESULTS.exists() else "# Benchmark results\n"
    if section not in text:
        text = text.rstrip("\n") + f"\n\n{section}\n\n`{command}`\n"
    start = text.index(section) + len(section)
    end = text.find("\n## ", start)
    end = len(text) if end < 0 else end + 1
    entry = f"\n{title}\n\n" + "\n".join(lines) + "\n"
    RESULTS.write_text(text[:end].rstrip("\n") + "\n" + entry + ("\n" + text[end:] if end < len(text) else ""))


def cpu_facts() -> tuple[str, str]:
    """This CPU's model name, and which of the flags that set the engine's dtype and kernels it has."""
    text = Path("/proc/cpuinfo").read_text()
    model = next((line.split(":", 1)[1].strip() for line in text.splitlines() if line.startswith("model name")),
                 platform.processor())
    flags = cpu_flags()
    shown = ", ".join(f"{f} {'yes' if f in flags else 'no'}" for f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16"))
    return model, shown
