"""The user documentation holds together: every relative link, image and #anchor in README.md,
docs/*.md, experiments/*/README.md and bench/README.md resolves (anchors by GitHub's heading
slugs), the README stays a short entry point that reaches every page, and no page cites the
project's issue numbers. The checker is itself tested on pages with known breakage."""
from __future__ import annotations

import re
import unicodedata
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
MAX_README_LINES = 220

FENCE = re.compile(r"^\s*(```|~~~)")
HEADING = re.compile(r"^ {0,3}(#{1,6})\s+(.*?)\s*#*\s*$")
MD_LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\[\]]*\])*\]\(\s*<?([^)\s>]*)>?(?:\s+\"[^\"]*\")?\s*\)")
REF_DEF = re.compile(r"^ {0,3}\[[^\]]+\]:\s*<?(\S+?)>?(?:\s+\"[^\"]*\")?\s*$")
HTML_LINK = re.compile(r"<(?:img|a|source)\b[^>]*?\b(?:src|href)\s*=\s*[\"']([^\"']*)[\"']", re.I)
HTML_ANCHOR = re.compile(r"<[a-z]+\b[^>]*?\b(?:id|name)\s*=\s*[\"']([^\"']+)[\"']", re.I)
CODE_SPAN = re.compile(r"(`+)(.+?)\1")
LINE_ANCHOR = re.compile(r"^L\d+(-L\d+)?$")
EXTERNAL = re.compile(r"^(?:[a-z][a-z0-9+.-]*:|//)", re.I)    # http:, https:, mailto:, //host


def doc_pages(root: Path = ROOT) -> list[Path]:
    """The pages users read: the README, docs/, the experiments' and the bench's READMEs."""
    pages = [root / "README.md", *sorted((root / "docs").glob("*.md")),
             *sorted(root.glob("experiments/*/README.md")), root / "bench" / "README.md"]
    return [p for p in pages if p.is_file()]


def prose_lines(text: str) -> list[tuple[int, str]]:
    """(line number, line) outside fenced code blocks."""
    out, fenced = [], None
    for number, line in enumerate(text.splitlines(), 1):
        m = FENCE.match(line)
        if m:
            if fenced is None:
                fenced = m.group(1)
            elif m.group(1) == fenced:
                fenced = None
            continue
        if fenced is None:
            out.append((number, line))
    return out


def heading_text(raw: str) -> str:
    """A heading's text as GitHub renders it: links and images by their text, code spans literal,
    emphasis markers and inline HTML tags gone."""
    text = re.sub(r"!?\[((?:[^\[\]]|\[[^\[\]]*\])*)\]\([^)]*\)", r"\1", raw)
    parts, last = [], 0
    for m in CODE_SPAN.finditer(text):
        parts.append(_strip_emphasis(text[last:m.start()]))
        parts.append(m.group(2).strip())
        last = m.end()
    parts.append(_strip_emphasis(text[last:]))
    return "".join(parts)


def _strip_emphasis(text: str) -> str:
    text = re.sub(r"<[^>]+>", "", text)
    text = text.replace("*", "")
    return re.sub(r"(?<![0-9A-Za-z])_+|_+(?![0-9A-Za-z])", "", text)


def github_slug(text: str) -> str:
    """GitHub's heading anchor: lowercase, punctuation dropped (letters, digits, marks, '_', '-'
    and spaces kept), each space a '-'."""
    kept = "".join(ch for ch in text.lower()
                   if ch in "-_ " or unicodedata.category(ch)[0] in "LNM")
    return kept.replace(" ", "-")


def anchors(page: Path) -> set[str]:
    """Every #anchor a page offers: heading slugs (repeats get -1, -2, ...) and HTML id/name."""
    found: set[str] = set()
    seen: dict[str, int] = {}
    text = page.read_text(encoding="utf-8")
    for _, line in prose_lines(text):
        m = HEADING.match(line)
        if m:
            slug = github_slug(heading_text(m.group(2)))
            n = seen.get(slug, 0)
            seen[slug] = n + 1
            found.add(slug if n == 0 else f"{slug}-{n}")
        found.update(HTML_ANCHOR.findall(line))
    return found


def links(page: Path) -> list[tuple[int, str]]:
    """(line, target) of every Markdown link, image, reference definition and HTML src/href,
    outside code blocks and code spans."""
    out = []
    for number, line in prose_lines(page.read_text(encoding="utf-8")):
        line = CODE_SPAN.sub("", line)
        targets = MD_LINK.findall(line) + HTML_LINK.findall(line)
        ref = REF_DEF.match(line)
        if ref:
            targets.append(ref.group(1))
        out += [(number, t) for t in targets]
    return out


def broken_links(page: Path, root: Path = ROOT) -> list[str]:
    """One line per relative link of `page` that does not resolve: a missing file or folder, an
    anchor no heading of the target makes, or a link out of the repository."""
    problems = []
    for number, target in links(page):
        where = f"{page.relative_to(root)}:{number}: {target!r}"
        if not target:
            problems.append(f"{where}: empty link")
            continue
        if EXTERNAL.match(target):
            continue
        path_part, _, anchor = target.partition("#")
        dest = (page.parent / path_part).resolve() if path_part else page
        if path_part.startswith("/") or not dest.is_relative_to(root.resolve()):
            problems.append(f"{where}: leaves the repository (GitHub resolves links relative to the page)")
        elif not dest.exists():
            problems.append(f"{where}: {dest.relative_to(root.resolve())} does not exist")
        elif anchor and dest.suffix.lower() == ".md":
            if anchor not in anchors(dest):
                problems.append(f"{where}: no heading in {dest.relative_to(root.resolve())} has the slug "
                                f"#{anchor}")
        elif anchor and not LINE_ANCHOR.match(anchor):
            problems.append(f"{where}: #{anchor} points into a non-Markdown file")
    return problems


# --- the checker on pages with known breakage -------------------------------------------------

def test_github_slugs_follow_githubs_rules():
    cases = {
        "Losses, and why each one": "losses-and-why-each-one",
        "MoA + ControlNet": "moa--controlnet",
        "Identity at high noise (experimental)": "identity-at-high-noise-experimental",
        "What sets the context ratio: the base, not the losses": "what-sets-the-context-ratio-the-base-not-the-losses",
        "`moa.format` and `__init__.py`": "moaformat-and-__init__py",
        "Train **your** own [adapter](docs/training.md)": "train-your-own-adapter",
        "snake_case_name stays": "snake_case_name-stays",
        "Évaluation — numbers": "évaluation--numbers",
    }
    assert {h: github_slug(heading_text(h)) for h in cases} == cases


@pytest.fixture
def site(tmp_path: Path) -> Path:
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "pic.png").write_bytes(b"\x89PNG")
    (tmp_path / "docs" / "guide.md").write_text(
        "# Guide\n\n## Setup\n\ntext\n\n## Setup\n\n### Step 1: install `moa`\n\n"
        "```\n## Not a heading\n```\n\n<a name=\"custom\"></a>\n", encoding="utf-8")
    return tmp_path


def _page(site: Path, body: str) -> Path:
    page = site / "README.md"
    page.write_text(body, encoding="utf-8")
    return page


def test_the_checker_accepts_links_that_resolve(site):
    page = _page(site, "# Top\n\n[guide](docs/guide.md) [s](docs/guide.md#setup) [s2](docs/guide.md#setup-1) "
                       "[step](docs/guide.md#step-1-install-moa) [c](docs/guide.md#custom) [self](#top)\n"
                       "![pic](docs/pic.png) <img src=\"docs/pic.png\"> [folder](docs/) "
                       "[web](https://example.com/missing#nowhere)\n"
                       "`[in code](missing.md)`\n\n```\n[in a block](missing.md)\n```\n")
    assert broken_links(page, site) == []


@pytest.mark.parametrize("link, problem", [
    ("[x](docs/gone.md)", "docs/gone.md does not exist"),
    ("![x](docs/gone.png)", "docs/gone.png does not exist"),
    ("<img src=\"docs/gone.png\" width=\"10\">", "docs/gone.png does not exist"),
    ("[x](docs/guide.md#setup-2)", "no heading in docs/guide.md has the slug #setup-2"),
    ("[x](docs/guide.md#not-a-heading)", "no heading in docs/guide.md has the slug #not-a-heading"),
    ("[x](#nowhere)", "no heading in README.md has the slug #nowhere"),
    ("[x](docs/pic.png#part)", "points into a non-Markdown file"),
    ("[x](../outside.md)", "leaves the repository"),
    ("[x]: docs/gone.md", "docs/gone.md does not exist"),
])
def test_the_checker_reports_each_kind_of_broken_link(site, link, problem):
    page = _page(site, f"# Top\n\n{link}\n")
    found = broken_links(page, site)
    assert len(found) == 1 and problem in found[0] and found[0].startswith("README.md:3:"), found


# --- the project's pages -----------------------------------------------------------------------

def test_the_pages_exist():
    names = {p.relative_to(ROOT).as_posix() for p in doc_pages()}
    for needed in ("README.md", "docs/nodes.md", "docs/training.md", "docs/evaluation.md", "docs/design.md",
                   "docs/adapter-format.md", "docs/applications.md", "docs/development.md",
                   "experiments/toy_world/README.md", "bench/README.md"):
        assert needed in names, f"{needed} is missing"


@pytest.mark.parametrize("page", doc_pages(), ids=lambda p: p.relative_to(ROOT).as_posix())
def test_every_relative_link_and_anchor_resolves(page):
    problems = broken_links(page)
    assert not problems, "broken links:\n" + "\n".join(problems)


def test_readme_is_a_short_entry_point_whose_sections_exist():
    lines = README.read_text(encoding="utf-8").splitlines()
    assert len(lines) < MAX_README_LINES, f"README.md has {len(lines)} lines; keep it under {MAX_README_LINES} " \
                                          f"and move detail to docs/"
    targets = [t for _, t in links(README) if not EXTERNAL.match(t)]
    sections = [t for t in targets if "#" in t]
    assert len(sections) >= 5, sections
    assert not broken_links(README)


def test_readme_reaches_every_page():
    """No orphan page: the README links every docs page and both experiment/bench READMEs."""
    linked = {(README.parent / t.partition("#")[0]).resolve() for _, t in links(README)
              if not EXTERNAL.match(t) and t.partition("#")[0]}
    orphans = [p.relative_to(ROOT).as_posix() for p in doc_pages() if p != README and p.resolve() not in linked]
    assert not orphans, f"pages the README does not link: {orphans}"


def test_readme_keeps_the_two_development_commands():
    """.ci/run and the packaging test run exactly these; the README is where newcomers find them."""
    text = README.read_text(encoding="utf-8")
    for command in ("bash scripts/dev.sh run", "bash scripts/dev.sh test"):
        assert command in text, f"README.md lost `{command}`"


def test_no_page_cites_issue_numbers():
    found = [f"{p.relative_to(ROOT)}:{n}: {line.strip()}" for p in doc_pages()
             for n, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1)
             if re.search(r"\bissues?\s*#\d+|(?<![\w&/])#\d+\b", line, re.I)]
    assert not found, "user pages cite issue numbers (say what was found instead):\n" + "\n".join(found)
