"""bench/RESULTS.md: each benchmark appends its runs to a section of its own."""
from __future__ import annotations

from pathlib import Path

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
