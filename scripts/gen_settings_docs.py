"""Write the settings tables of README.md and docs/configuration.md from MemsafeSettings.

The tables sit between ``<!-- settings:begin -->`` and ``<!-- settings:end -->``; everything
else in the files is left alone. ``--check`` writes nothing and fails when a file differs
from what it would write (``tests/unit/test_settings.py`` runs it).

    python scripts/gen_settings_docs.py [--check]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from airflow_memsafe.config import setting_specs

REPO = Path(__file__).resolve().parents[1]
DOCS = (REPO / "README.md", REPO / "docs" / "configuration.md")
BEGIN, END = "<!-- settings:begin -->", "<!-- settings:end -->"


def table() -> str:
    """The Markdown table, one row per field of MemsafeSettings."""
    lines = [
        BEGIN,
        "<!-- generated from airflow_memsafe/config.py by scripts/gen_settings_docs.py -->",
        "",
        "| setting | default | unit | allowed | meaning |",
        "|---|---|---|---|---|",
    ]
    for spec in setting_specs():
        allowed = spec.bounds_text.replace("|", "\\|") or spec.type_name
        default = spec.default_text.replace("<", "&lt;")  # <tmp> is no HTML tag
        lines.append(
            f"| `{spec.name}` | {default} | {spec.info.unit} | {allowed} "
            f"| {spec.info.description} |"
        )
    return "\n".join([*lines, END])


def render(text: str, path: Path) -> str:
    """``text`` with its settings block replaced by :func:`table`."""
    start, end = text.find(BEGIN), text.find(END)
    if start < 0 or end < start:
        raise SystemExit(f"{path}: no {BEGIN} ... {END} block")
    return text[:start] + table() + text[end + len(END) :]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="fail if a file is out of date")
    args = parser.parse_args(argv)
    stale = []
    for path in DOCS:
        text = path.read_text()
        new = render(text, path)
        if new != text:
            stale.append(path.relative_to(REPO))
            if not args.check:
                path.write_text(new)
    if args.check and stale:
        print(f"out of date: {', '.join(map(str, stale))}; run python {__file__}")
        return 1
    if not args.check:
        print(f"updated: {', '.join(map(str, stale)) or 'nothing'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
