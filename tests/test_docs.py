"""The documentation against the code: every `quantship ...` example in README.md and docs/ parses with the real
parser, and every relative link in them points at a file (and heading) that exists. Cheap: no model is built."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", ROOT / "benchmarks" / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
FENCE = re.compile(r"```[a-z]*\n(.*?)```", re.S)
INLINE = re.compile(r"`(quantship [^`]+)`")
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")


def _commands(text: str, tables: bool) -> list[str]:
    """Each `quantship` invocation in fenced blocks (continuation lines joined, comments cut) and in tables' inline
    code of the README's table of commands (elsewhere inline code names a command or option: no example)."""
    found = []
    for block in FENCE.findall(text):
        for line in block.replace("\\\n", " ").splitlines():
            line = line.split(" #", 1)[0].strip()
            for part in re.split(r"&&|;", line):
                words = part.split()
                if "quantship" in words:
                    found.append(" ".join(words[words.index("quantship") :]))
    for line in text.splitlines() if tables else ():
        if line.startswith("|"):
            found += [c for c in INLINE.findall(line) if "COMMAND" not in c]
    return found


def _examples() -> list[tuple[str, str]]:
    out = []
    for page in PAGES:
        for command in _commands(page.read_text(), tables=page.name == "README.md" and page.parent == ROOT):
            out.append((page.relative_to(ROOT).as_posix(), command))
    return out


EXAMPLES = _examples()


def _slug(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation but '-' and '_' dropped, spaces to '-'."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def test_the_pages_hold_commands():
    pages = {page for page, _ in EXAMPLES}
    assert "README.md" in pages and len(EXAMPLES) >= 30, EXAMPLES


@pytest.mark.parametrize(("page", "command"), EXAMPLES, ids=[f"{p}:{c[:60]}" for p, c in EXAMPLES])
def test_every_documented_command_parses(page, command):
    from quantship.cli import build_parser

    argv = shlex.split(command)[1:]
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exc:
        pytest.fail(f"{page}: `{command}` does not parse (exit {exc.code})")
    assert args.command == argv[0]


def test_every_relative_link_resolves():
    broken = []
    for page in PAGES:
        for target in LINK.findall(page.read_text()):
            if re.match(r"[a-z]+:", target):
                continue  # https://, mailto:
            path, _, anchor = target.partition("#")
            file = (page.parent / path).resolve() if path else page
            if not file.exists():
                broken.append(f"{page.relative_to(ROOT)}: {target} (no such file)")
                continue
            if anchor and file.suffix == ".md":
                headings = re.findall(r"^#+ (.+)$", file.read_text(), re.M)
                if anchor not in {_slug(h) for h in headings}:
                    broken.append(f"{page.relative_to(ROOT)}: {target} (no such heading)")
    assert not broken, "\n".join(broken)


def test_the_readme_links_every_docs_page():
    readme = (ROOT / "README.md").read_text()
    unlinked = [p.name for p in (ROOT / "docs").glob("*.md") if f"(docs/{p.name})" not in readme]
    assert not unlinked, f"docs pages the README does not link: {unlinked}"
