"""The docs hold together: the generated config reference is current, relative links and their anchors resolve,
the README stays short, and every ``python`` block parses. Pure file reading, no processes."""
from __future__ import annotations

import ast
import difflib
import importlib.util
import re
import sys
import textwrap
from pathlib import Path
from types import ModuleType
from urllib.parse import unquote

import pytest

ROOT = Path(__file__).resolve().parents[2]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
README_MAX_LINES = 220

_FENCE = re.compile(r"^ {0,3}(`{3,}|~{3,})\s*([^`\s]*)")
_HEADING = re.compile(r"^ {0,3}#{1,6}\s+(.*?)(?:\s+#+)?\s*$")
# An inline link or image: [text](target "title"). The text may wrap over lines; the target may not.
_LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\[\]]*\])*\]\(\s*<?([^)\s>]*)>?(?:\s+\"[^\"]*\")?\s*\)")
_CODE_SPAN = re.compile(r"(`+)(?!`).*?(?<!`)\1(?!`)", re.DOTALL)
_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*:")


def _load_generator() -> ModuleType:
    # tools/ is not a package; load the script by path, so the test checks the very code a contributor runs.
    spec = importlib.util.spec_from_file_location("gen_config_reference", ROOT / "tools" / "gen_config_reference.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    # Registered first, as an import would: its dataclass looks its own module up while being defined.
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def split_markdown(text: str) -> tuple[str, list[tuple[str, int, str]]]:
    """(the text outside fenced code blocks, with each block's lines blanked; the blocks as (language, first line
    number, code)). Blanking keeps line numbers, and keeps `# comments` in code from being taken for headings."""
    prose: list[str] = []
    blocks: list[tuple[str, int, str]] = []
    fence = ""
    for number, line in enumerate(text.splitlines(), 1):
        match = _FENCE.match(line)
        if not fence:
            if match:
                fence = match.group(1)
                blocks.append((match.group(2).lower(), number + 1, ""))
                prose.append("")
            else:
                prose.append(line)
            continue
        if match and match.group(1)[0] == fence[0] and len(match.group(1)) >= len(fence) and not match.group(2) \
                and line.strip() == match.group(1):
            fence = ""
        else:
            language, start, code = blocks[-1]
            blocks[-1] = (language, start, code + line + "\n")
        prose.append("")
    return "\n".join(prose), blocks


def github_anchor(heading: str) -> str:
    """GitHub's anchor for a heading: lowercase, punctuation dropped except '-' and '_', spaces to '-'."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link in a heading contributes its text
    return re.sub(r"[^\w\- ]", "", text.strip().lower()).replace(" ", "-")


def anchors(text: str) -> set[str]:
    prose, _ = split_markdown(text)
    seen: dict[str, int] = {}
    out = set()
    for line in prose.splitlines():
        match = _HEADING.match(line)
        if not match:
            continue
        anchor = github_anchor(match.group(1))
        # GitHub numbers repeated headings: x, x-1, x-2, ...
        count = seen.get(anchor, 0)
        seen[anchor] = count + 1
        out.add(anchor if count == 0 else f"{anchor}-{count}")
    return out


def links(text: str) -> list[tuple[int, str]]:
    """(line number, target) of every inline link and image outside code blocks and code spans."""
    prose, _ = split_markdown(text)
    # Code spans become spaces of the same shape (newlines kept), so `[x](y)` in code is no link.
    prose = _CODE_SPAN.sub(lambda m: re.sub(r"[^\n]", " ", m.group(0)), prose)
    return [(prose.count("\n", 0, m.start()) + 1, m.group(1)) for m in _LINK.finditer(prose)]


def broken_links(path: Path, root: Path = ROOT) -> list[str]:
    """Every relative link of ``path`` whose file, or whose #anchor in a Markdown file, does not exist."""
    problems = []
    cache: dict[Path, set[str]] = {}
    for line, target in links(path.read_text(encoding="utf-8")):
        if not target or _SCHEME.match(target) or target.startswith("//"):
            continue  # external (https:, mailto:) or empty: nothing on disk to check
        file_part, _, anchor = target.partition("#")
        dest = path if not file_part else (path.parent / unquote(file_part)).resolve()
        where = f"{path.relative_to(root)}:{line}: {target}"
        if not dest.exists():
            problems.append(f"{where}: no such file")
            continue
        if anchor and dest.suffix == ".md":
            if dest not in cache:
                cache[dest] = anchors(dest.read_text(encoding="utf-8"))
            if anchor not in cache[dest]:
                problems.append(f"{where}: no heading with anchor #{anchor} in {dest.relative_to(root)}")
    return problems


def test_configuration_reference_is_current() -> None:
    expected = _load_generator().render()
    path = ROOT / "docs" / "configuration.md"
    current = path.read_text(encoding="utf-8") if path.exists() else ""
    if current != expected:
        diff = "".join(list(difflib.unified_diff(current.splitlines(True), expected.splitlines(True),
                                                 "docs/configuration.md", "generated"))[:40])
        pytest.fail("docs/configuration.md is stale: run .venv/bin/python tools/gen_config_reference.py > "
                    f"docs/configuration.md\n{diff}")


def test_relative_links_resolve() -> None:
    problems = [p for doc in DOCS for p in broken_links(doc)]
    assert not problems, "broken links:\n" + "\n".join(problems)


def test_readme_is_short() -> None:
    lines = len((ROOT / "README.md").read_text(encoding="utf-8").splitlines())
    assert lines <= README_MAX_LINES, f"README.md has {lines} lines (at most {README_MAX_LINES}): move detail to docs/"


def test_python_blocks_parse() -> None:
    problems = []
    for doc in DOCS:
        _, blocks = split_markdown(doc.read_text(encoding="utf-8"))
        for language, start, code in blocks:
            if language not in ("python", "py", "python3"):
                continue
            try:
                ast.parse(textwrap.dedent(code))
            except SyntaxError as err:
                # A block that is not meant to be Python should say so with another fence language.
                problems.append(f"{doc.relative_to(ROOT)}:{start + (err.lineno or 1) - 1}: {err.msg}")
    assert not problems, "python blocks that do not parse:\n" + "\n".join(problems)


# The checker itself, on small inputs: a checker that found nothing would pass the tests above too.

@pytest.mark.parametrize(("heading", "anchor"), [
    ("Warm starts (zygote)", "warm-starts-zygote"),
    ("Buffers of replicated modules are rank 0's", "buffers-of-replicated-modules-are-rank-0s"),
    ("`ftrain status`: the run now", "ftrain-status-the-run-now"),
    ("`shard-RRRRR.json`", "shard-rrrrrjson"),
    ("Remote tier (`benchmarks/remote.py --mib 64`, median)", "remote-tier-benchmarksremotepy---mib-64-median"),
    ("keep_last and max_restarts", "keep_last-and-max_restarts"),
])
def test_github_anchor(heading: str, anchor: str) -> None:
    assert github_anchor(heading) == anchor


def test_checker_finds_links_and_skips_code() -> None:
    text = textwrap.dedent("""\
        # Title
        ## Title
        See [a wrapped
        link](other.md#part) and `[not](a-link.md)`.
        ```sh
        # not a heading
        [nor](this.md)
        ```
        ![image](pic.png)
        """)
    assert links(text) == [(3, "other.md#part"), (9, "pic.png")]
    assert anchors(text) == {"title", "title-1"}


def test_checker_reports_missing_file_and_anchor(tmp_path: Path) -> None:
    (tmp_path / "b.md").write_text("# Here\n")
    doc = tmp_path / "a.md"
    doc.write_text("[ok](b.md#here) [gone](c.md) [bad](b.md#there) [self](#top) [web](https://x.org/#y)\n# Top\n")
    assert broken_links(doc, tmp_path) == [
        "a.md:1: c.md: no such file",
        "a.md:1: b.md#there: no heading with anchor #there in b.md",
    ]
