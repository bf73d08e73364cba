"""Generated files (docs tables, sync twins) match their sources."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_generated_docs_are_fresh() -> None:
    result = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "gen_docs.py"), "--check"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_every_order_status_is_documented() -> None:
    from idempay.core.orders import OrderStatus

    text = (ROOT / "docs" / "concepts.md").read_text(encoding="utf-8")
    for status in OrderStatus:
        assert f"| `{status.value}` |" in text


def test_sync_twins_are_generated_from_their_async_sources() -> None:
    result = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "unasync.py"), "--check"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def _snippets(text: str) -> list[tuple[str, str]]:
    """The code blocks marked ``<!-- snippet: PATH -->``, with their PATH."""
    found = []
    lines = text.splitlines()
    for i, line in enumerate(lines):
        if line.startswith("<!-- snippet: ") and line.endswith(" -->"):
            path = line[len("<!-- snippet: ") : -len(" -->")]
            assert lines[i + 1].startswith("```"), f"no code block after {line}"
            end = lines.index("```", i + 2)
            found.append((path, "\n".join(lines[i + 2 : end])))
    return found


def test_snippets_in_the_docs_are_real_code_from_the_examples() -> None:
    import textwrap

    checked = 0
    for page in sorted((ROOT / "docs").glob("*.md")):
        for path, snippet in _snippets(page.read_text(encoding="utf-8")):
            source = (ROOT / path).read_text(encoding="utf-8")
            dedented = textwrap.dedent(source)
            # A snippet is a contiguous run of the file, possibly dedented from a function.
            body = textwrap.dedent(snippet)
            assert (
                any(
                    textwrap.dedent("\n".join(source.splitlines()[i : i + len(body.splitlines())]))
                    == body
                    for i in range(len(source.splitlines()))
                )
                or body in dedented
            ), f"{page.name}: a snippet is not in {path}"
            checked += 1
    assert checked >= 4
