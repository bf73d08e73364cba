"""Regenerate the parts of docs/ that are derived from the code.

Usage: ``python scripts/gen_docs.py`` rewrites them; ``--check`` exits 1 if they are stale.
"""

from __future__ import annotations

import argparse
import re
import sys
from collections.abc import Callable
from pathlib import Path

from idempay.core.orders import transition_table_markdown

ROOT = Path(__file__).resolve().parent.parent

BLOCKS: dict[tuple[str, str], Callable[[], str]] = {
    ("docs/concepts.md", "order-states"): transition_table_markdown,
}


def render(text: str, name: str, content: str) -> str:
    """Return ``text`` with the generated block ``name`` replaced by ``content``."""
    tag = re.escape(name)
    pattern = re.compile(
        rf"(<!-- BEGIN GENERATED: {tag} -->\n).*?(<!-- END GENERATED: {tag} -->)", re.DOTALL
    )
    if not pattern.search(text):
        msg = f"no generated block named {name!r}"
        raise ValueError(msg)
    return pattern.sub(lambda m: m.group(1) + content.rstrip("\n") + "\n" + m.group(2), text)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--check", action="store_true", help="fail if a generated part is stale")
    args = parser.parse_args(argv)
    stale = []
    for (relative, name), make in BLOCKS.items():
        path = ROOT / relative
        text = path.read_text(encoding="utf-8")
        updated = render(text, name, make())
        if updated != text:
            stale.append(f"{relative} ({name})")
            if not args.check:
                path.write_text(updated, encoding="utf-8")
    if args.check and stale:
        sys.stdout.write("stale generated docs: " + ", ".join(stale) + "\n")
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
