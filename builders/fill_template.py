"""Fill `${name}` placeholders in Triton config templates.

Same convention as tensorrtllm_backend's `tools/fill_template.py`, so the same commands work on
both sets of templates:

    python -m plateforme.builders.fill_template -i config.pbtxt triton_max_batch_size:64,engine_dir:/e

Substitutions are `key:value` pairs separated by commas; a backslash escapes `,` or `:` in a
value. Placeholders that are not given stay as they are (the tensorrtllm backend ignores
parameters whose value is still `${...}`).
"""
from __future__ import annotations

import argparse
import string
import sys
from pathlib import Path

from plateforme.builders.atomic import atomic_write_text

# Numeric fields that upstream fills by default: left as `${...}` they would not parse.
DEFAULTS = {"max_queue_size": "0", "max_queue_delay_microseconds": "0"}


class TemplateError(ValueError):
    pass


def split_escaped(text: str, delimiter: str) -> list[str]:
    parts, current, escaped = [], [], False
    for char in text:
        if escaped:
            current.append(char)
            escaped = False
        elif char == "\\":
            escaped = True
        elif char == delimiter:
            parts.append("".join(current))
            current = []
        else:
            current.append(char)
    parts.append("".join(current))
    return parts


def parse_substitutions(text: str) -> dict[str, str]:
    values: dict[str, str] = {}
    for item in split_escaped(text, ","):
        if not item:
            continue
        pieces = split_escaped(item, ":")
        if len(pieces) < 2:
            raise TemplateError(f"substitution {item!r} is not key:value")
        key, value = pieces[0], ":".join(pieces[1:])
        values[key] = value
    return values


def placeholders(template_text: str) -> set[str]:
    return {
        match.group("named") or match.group("braced")
        for match in string.Template.pattern.finditer(template_text)
        if match.group("named") or match.group("braced")
    }


def fill_template(template_text: str, values: dict[str, object], strict: bool = True) -> str:
    """Substitute `values`; with `strict`, every key must be a placeholder of the template."""
    if strict:
        unknown = set(values) - placeholders(template_text)
        if unknown:
            raise TemplateError(f"the template has no placeholder(s) {sorted(unknown)}")
    merged = {**DEFAULTS, **{k: str(v) for k, v in values.items()}}
    return string.Template(template_text).safe_substitute(merged)


def fill_file(path: Path, substitutions: str, in_place: bool = False) -> str:
    """The template at `path` filled from "key_1:value_1,..."; with `in_place`, also written back
    (atomically)."""
    filled = fill_template(Path(path).read_text(), parse_substitutions(substitutions))
    if in_place:
        atomic_write_text(path, filled)
    return filled


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("file_path", type=Path, help="the config.pbtxt template")
    parser.add_argument("substitutions", help="key_1:value_1,key_2:value_2,...")
    parser.add_argument("-i", "--in_place", "--in-place", action="store_true",
                        help="rewrite the file instead of printing it")
    args = parser.parse_args(argv)
    try:
        filled = fill_file(args.file_path, args.substitutions, args.in_place)
    except (OSError, TemplateError) as exc:
        print(f"fill_template: {exc}", file=sys.stderr)
        return 2
    if not args.in_place:
        sys.stdout.write(filled)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
