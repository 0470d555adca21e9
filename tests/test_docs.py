"""The documentation: README stays short, every relative link resolves, every page is in the site's nav."""

from __future__ import annotations

import re
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
README = ROOT / "README.md"
README_MAX_LINES = 250

FENCE = re.compile(r"^(```|~~~).*?^\1", re.S | re.M)  # fenced code blocks: their brackets are code
INLINE_CODE = re.compile(r"`[^`\n]*`")
LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")  # [text](target "title")


def pages() -> list[Path]:
    return sorted(DOCS.rglob("*.md"))


def links(path: Path) -> list[str]:
    """The targets of the Markdown links and images in a file, outside code."""
    text = INLINE_CODE.sub("", FENCE.sub("", path.read_text(encoding="utf-8")))
    return LINK.findall(text)


def relative(target: str) -> str | None:
    """The file part of a relative link; None for web addresses, mail and in-page anchors."""
    if re.match(r"^[a-z][a-z0-9+.-]*:", target, re.I) or target.startswith("#"):
        return None
    return target.split("#", 1)[0] or None


def broken(path: Path, inside: Path | None = None) -> list[str]:
    """The relative links of `path` that resolve to no file (or, with `inside`, to one outside it)."""
    bad = []
    for target in links(path):
        file = relative(target)
        if file is None:
            continue
        resolved = (path.parent / file).resolve()
        if not resolved.exists():
            bad.append(f"{path.relative_to(ROOT)}: {target} (no such file)")
        elif inside is not None and not resolved.is_relative_to(inside.resolve()):
            bad.append(f"{path.relative_to(ROOT)}: {target} (outside {inside.name}/: write it as code)")
    return bad


def nav_pages(node) -> set[str]:
    """Every page named anywhere in mkdocs.yml's nav."""
    if isinstance(node, str):
        return {node} if node.endswith(".md") else set()
    if isinstance(node, dict):
        return set().union(*(nav_pages(v) for v in node.values()))
    if isinstance(node, list):
        return set().union(*(nav_pages(v) for v in node))
    return set()


def test_readme_is_short():
    lines = README.read_text(encoding="utf-8").count("\n")
    assert lines <= README_MAX_LINES, f"README.md: {lines} lines, over {README_MAX_LINES}; move text to docs/"


def test_the_link_parser_finds_links_and_skips_code():
    assert relative("docs/a.md#part") == "docs/a.md"
    assert relative("https://example.org/x.md") is None and relative("#part") is None
    assert links(README)  # README links its guides and results


def test_every_relative_link_in_readme_resolves():
    assert broken(README) == []


def test_every_relative_link_in_the_docs_resolves_inside_docs():
    assert pages(), "no docs/**/*.md"
    bad = [line for page in pages() for line in broken(page, inside=DOCS)]
    assert bad == [], "\n".join(bad)


def test_every_docs_page_is_in_the_mkdocs_nav():
    config = yaml.safe_load((ROOT / "mkdocs.yml").read_text(encoding="utf-8"))
    assert config.get("docs_dir", "docs") == "docs"
    listed = nav_pages(config["nav"])
    present = {p.relative_to(DOCS).as_posix() for p in pages()}
    assert present - listed == set(), "pages missing from mkdocs.yml's nav"
    assert listed - present == set(), "nav entries without a page"


def table_rows(path: Path) -> dict[str, list[str]]:
    """The rows of a page's Markdown tables whose first cell is `code`, by that name."""
    rows = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.startswith("| `") and len(cells) > 1:
            rows[cells[0].strip("`").split("`")[0]] = cells[1:]
    return rows


def test_the_targets_guide_has_a_row_for_every_registered_format_and_constraint():
    from tofa_core.constraints import CONSTRAINTS
    from tofa_core.formats import FORMATS

    rows = table_rows(DOCS / "guides" / "targets.md")
    for fmt in FORMATS:
        assert fmt.name in rows, f"docs/guides/targets.md: no row for the format {fmt.name}"
        assert rows[fmt.name][0] == f"`{fmt.file}`", (fmt.name, rows[fmt.name])
    for c in CONSTRAINTS:
        assert c.field in rows, f"docs/guides/targets.md: no row for the constraint {c.field}"
    listed = {name for name, cells in rows.items() if cells[0].startswith("`model.")}
    assert listed == {f.name for f in FORMATS}, "a row for a format the registry does not have"


def test_the_sites_home_page_is_the_readme():
    """docs/index.md is README with its links made relative to docs/ (`make docs` writes it)."""
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    home = (DOCS / "index.md").read_text(encoding="utf-8")
    assert home == readme.replace("](docs/", "]("), "docs/index.md is stale: run `make docs`"
