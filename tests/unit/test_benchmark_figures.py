"""Every published figure comes from a committed result (the rule is written in docs/benchmarks.md,
"How figures are checked").

A page is cut into blocks: a paragraph, a top-level list item (with its nested lines), a row of a
table, a fenced block of printed output (a fence without a language). A block *cites* a results
folder when it names ``benchmarks/results/<name>`` (a folder or a file in it); outside
docs/benchmarks.md a link to a section of docs/benchmarks.md cites every folder that section cites.
A table's rows also cite what the block just before the table (its caption) cites. On the pages
that hold figures (STRICT_PAGES), a block that cites nothing itself is checked against every folder
cited before it in its section (up to the next heading): a section names its results once, before
its figures.

* Every number in a block that cites a folder must be found in that folder's files (or in the
  file it cites, when it names a file: the narrower check, for folders holding thousands of
  figures): a value of a JSON file (or a number inside one of its strings, or a key) or a number in
  a text file (.md, .txt, .toml, .csv), equal at the precision the page prints (0.994 matches
  0.99431; 93.5 matches 0.935, a percentage). In a folder holding thousands of figures a wrong
  number can still match another figure by chance: the check catches figures from runs that were
  never kept and most typos, not every one. A bound, ``p < 0.001``, is found when the folder's text says ``< 0.001`` or a
  p-value in its JSON (a key ``p``, ``p_value``, ``..._p``) is below it. Numbers inside `code spans`,
  link targets and headings are not figures.
* In docs/benchmarks.md, and in the README sections listed in README_FIGURE_SECTIONS, a block that
  holds a number must cite a folder.
* Every cited folder exists and holds a run.json with the command, git commit, machine, date and
  wall time (``benchmarks/common.py: write_run``), and a results file.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[2]
BENCHMARKS_PAGE = "docs/benchmarks.md"
STRICT_PAGES = {BENCHMARKS_PAGE: None, "README.md": ("The two commands", "What the figures promise")}
README_FIGURE_SECTIONS = STRICT_PAGES["README.md"]
# results committed before write_run existed, with what their run.json lacks and why (none left: the last,
# experiment-kermany, was re-run)
RUN_RECORD_GAPS: dict[str, str] = {}

CITE = re.compile(r"benchmarks/results/[A-Za-z0-9_.\-]+(?:/[A-Za-z0-9_.\-]+)*")
LINK = re.compile(r"\]\(([^)\s]*)\)")
# a number on the page: not glued to a word on its left (layer4, Lite0, r0.9, ResNet-50, 1e-3) nor on its
# right, except an "x" of a ratio (2.3x) ; 1,764 is one number
DOC_NUMBER = re.compile(
    r"(<\s*)?(?<![\w.,/])(?<![A-Za-z]-)(?<!\de-)(\d{1,3}(?:,\d{3})+(?:\.\d+)?|\d+(?:\.\d+)?)(?=x\b|[^\w]|$)(?!\.\d)"
)
P_KEY = re.compile(r"(^|_)p($|_)|p_?value", re.I)
ANY_NUMBER = re.compile(r"\d{1,3}(?:,\d{3})+(?:\.\d+)?|\d+(?:\.\d+)?(?:[eE][-+]?\d+)?")
TEXT_SUFFIXES = {".md", ".txt", ".toml", ".csv"}


@dataclass
class Block:
    page: str
    line: int
    kind: str  # "text", "row" (of a table), "output"
    text: str
    section: list[str]
    cites: set[str] = field(default_factory=set)


def slug(heading: str) -> str:
    text = re.sub(r"[`*_]", "", heading.strip().lower())
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def parse(page: str) -> tuple[list[Block], dict[str, list[Block]]]:
    """The page's blocks, and for each heading's anchor the blocks of its section (subsections too)."""
    lines = (ROOT / page).read_text(encoding="utf-8").splitlines()
    blocks: list[Block] = []
    headings: list[tuple[int, str]] = []  # (level, title) of the current path
    current: Block | None = None
    fence: str | None = None

    def close() -> None:
        nonlocal current
        if current is not None and current.text.strip():
            blocks.append(current)
        current = None

    def start(kind: str, number: int) -> Block:
        close()
        return Block(page, number, kind, "", [t for _, t in headings])

    for number, line in enumerate(lines, 1):
        if fence is not None:
            if line.strip().startswith("```"):
                fence = None
                close()
            elif current is not None:
                current.text += line + "\n"
            continue
        if line.strip().startswith("```"):
            language = line.strip()[3:].strip()
            fence = language
            current = start("output", number) if not language else None
            if language:
                close()
            continue
        if line.startswith("#"):
            close()
            level = len(line) - len(line.lstrip("#"))
            while headings and headings[-1][0] >= level:
                headings.pop()
            headings.append((level, line.lstrip("#").strip()))
            continue
        if not line.strip():
            close()
            continue
        if line.startswith("|"):
            current = start("row", number)  # each row of a table is a block
        elif re.match(r"([-*]|\d+\.)\s", line) or current is None or current.kind == "row":
            current = start("text", number)
        current.text += line + "\n"
    close()

    sections: dict[str, list[Block]] = {}
    for block in blocks:
        for title in block.section:
            sections.setdefault(slug(title), []).append(block)
    return blocks, sections


def direct_citations(block: Block) -> set[str]:
    """The results folders and files the block names (a file narrows the check to that file)."""
    return {path.rstrip("/.") for path in CITE.findall(block.text)}


BROKEN_LINKS: list[str] = []


@cache
def page(name: str) -> tuple[list[Block], dict[str, list[Block]]]:
    blocks, sections = parse(name)
    for block in blocks:
        block.cites = direct_citations(block)
    if name != BENCHMARKS_PAGE:
        _, bench_sections = page(BENCHMARKS_PAGE)
        for block in blocks:
            for target in LINK.findall(block.text):
                if "benchmarks.md#" in target:
                    anchor = target.split("#", 1)[1]
                    if anchor not in bench_sections:
                        BROKEN_LINKS.append(
                            f"{name}:{block.line}: links #{anchor}, no such section in {BENCHMARKS_PAGE}"
                        )
                        continue
                    for cited in bench_sections[anchor]:
                        block.cites |= direct_citations(cited)
    # a block citing nothing is checked against every folder cited before it in its section; a table's
    # rows also against their caption's folders
    earlier: dict[tuple[str, ...], set[str]] = {}
    caption: Block | None = None
    for i, block in enumerate(blocks):
        if i and blocks[i - 1].kind != "row":
            caption = blocks[i - 1] if blocks[i - 1].section == block.section else None
        own = set(block.cites)
        if block.kind == "row" and caption is not None:
            block.cites |= caption.cites
        if not block.cites and name in STRICT_PAGES:
            block.cites = set(earlier.get(tuple(block.section), set()))
        earlier.setdefault(tuple(block.section), set()).update(own)
    return blocks, sections


def figures_text(block: Block) -> str:
    """The block as prose: without code spans, link targets, HTML comments or addresses."""
    if block.kind == "output":
        return block.text
    text = re.sub(r"<!--.*?-->", " ", block.text, flags=re.S)
    text = re.sub(r"`[^`]*`", " ", text)
    text = LINK.sub("]", text)
    return re.sub(r"https?://\S+", " ", text)


def numbers_in(block: Block) -> list[str]:
    """The block's numbers as printed; a bound keeps its "<" (``<0.001``)."""
    return [("<" if bound else "") + number for bound, number in DOC_NUMBER.findall(figures_text(block))]


@cache
def values_in(folder: str) -> np.ndarray:
    """Every number the folder's results hold, as a sorted array of absolute values."""
    return folder_numbers(folder)[0]


@cache
def folder_numbers(folder: str) -> tuple[np.ndarray, list[float], str]:
    """The folder's numbers (sorted absolute values), its JSON p-values, and its text files' text."""
    found: list[float] = []
    p_values: list[float] = []
    texts: list[str] = []

    def text_numbers(text: str) -> None:
        found.extend(float(m.replace(",", "")) for m in ANY_NUMBER.findall(text))

    def walk(value: object) -> None:
        if isinstance(value, bool) or value is None:
            return
        if isinstance(value, (int, float)):
            found.append(float(value))
        elif isinstance(value, str):
            text_numbers(value)
        elif isinstance(value, dict):
            for key, item in value.items():
                text_numbers(str(key))
                if P_KEY.search(str(key)) and isinstance(item, float):
                    p_values.append(item)
                walk(item)
        elif isinstance(value, list):
            for item in value:
                walk(item)

    where = ROOT / folder
    for path in sorted(where.rglob("*")) if where.is_dir() else [where]:
        if path.suffix == ".json":
            walk(json.loads(path.read_text(encoding="utf-8")))
        elif path.suffix in TEXT_SUFFIXES:
            texts.append(path.read_text(encoding="utf-8"))
            text_numbers(texts[-1])
    values = np.abs(np.array([v for v in found if np.isfinite(v)], dtype=float))
    return np.sort(values), p_values, "\n".join(texts)


def found(number: str, folders: set[str]) -> bool:
    if number.startswith("<"):
        bound = float(number[1:])
        return any(
            re.search(rf"<\s*{re.escape(number[1:])}(?!\d)", folder_numbers(f)[2])
            or any(0 <= p < bound for p in folder_numbers(f)[1])
            for f in folders
        )
    decimals = len(number.split(".", 1)[1]) if "." in number else 0
    value = float(number.replace(",", ""))
    half = 0.5 * 10.0**-decimals + 1e-9 * max(1.0, value)
    for folder in folders:
        values = values_in(folder)
        for scale in (1.0, 100.0):  # as printed, or a fraction printed as a percentage
            lo, hi = (value - half) / scale, (value + half) / scale
            i = np.searchsorted(values, lo)
            if i < len(values) and values[i] <= hi:
                return True
    return False


def problems(name: str) -> list[str]:
    blocks, _ = page(name)
    strict = name in STRICT_PAGES
    sections = STRICT_PAGES.get(name)
    out = [line for line in BROKEN_LINKS if line.startswith(f"{name}:")]
    for block in blocks:
        numbers = numbers_in(block)
        if not numbers:
            continue
        if not block.cites:
            if strict and (sections is None or any(s in block.section for s in sections)):
                out.append(
                    f"{name}:{block.line}: figures {numbers[:6]} without a results folder "
                    "(cite benchmarks/results/<name>/ in the block, or in the caption just before a table)"
                )
            continue
        for folder in sorted(block.cites):
            if not (ROOT / folder).exists():
                out.append(f"{name}:{block.line}: cites {folder}, which does not exist")
        missing = [n for n in numbers if not found(n, block.cites)]
        if missing:
            out.append(f"{name}:{block.line}: {missing} not in {sorted(block.cites)}")
    return out


def checked_pages() -> list[str]:
    return ["README.md", *sorted(str(p.relative_to(ROOT)) for p in (ROOT / "docs").glob("*.md"))]


@pytest.mark.parametrize("name", checked_pages())
def test_every_quoted_figure_is_in_its_results_folder(name: str) -> None:
    found_problems = problems(name)
    assert not found_problems, "\n".join(found_problems)


def test_the_benchmarks_page_cites_a_results_folder_in_every_figure_section() -> None:
    blocks, _ = page(BENCHMARKS_PAGE)
    cited = set().union(*(b.cites for b in blocks))
    assert cited, "docs/benchmarks.md cites no results folder"
    # the check must not pass by finding nothing: most figure blocks hold numbers
    assert sum(len(numbers_in(b)) for b in blocks if b.cites) > 100


def cited_folders() -> list[str]:
    folders: set[str] = set()
    for name in checked_pages():
        for block in page(name)[0]:
            folders |= {str(Path(c).parent) if (ROOT / c).is_file() else c for c in block.cites}
    # a subfolder (shift/seed1) is part of its parent's result
    return sorted(f for f in folders if not any(f != g and f.startswith(g + "/") for g in folders))


@pytest.mark.parametrize("folder", cited_folders())
def test_every_cited_result_records_how_it_was_made(folder: str) -> None:
    path = ROOT / folder
    assert path.is_dir(), f"{folder} is cited but does not exist"
    run = json.loads((path / "run.json").read_text(encoding="utf-8"))
    assert run.get("command"), f"{folder}/run.json: no command line"
    results = [p for p in path.iterdir() if p.name != "run.json" and p.suffix in {".json", ".md", ".txt"}]
    assert results, f"{folder}: no results file beside run.json"
    name = Path(folder).name
    if name in RUN_RECORD_GAPS:
        assert "git" not in run, f"{folder}: run.json now records the commit: drop it from RUN_RECORD_GAPS"
        return
    assert run.get("git", {}).get("commit"), f"{folder}/run.json: no git commit"
    assert "dirty" in run["git"], f"{folder}/run.json: no dirty flag"
    machine = run.get("machine", {})
    assert machine.get("cpu") and machine.get("cores") and machine.get("torch"), f"{folder}/run.json: no machine"
    assert run.get("date"), f"{folder}/run.json: no date"
    assert run.get("wall_seconds", run.get("seconds")) is not None, f"{folder}/run.json: no wall time"


def test_the_matching_rule() -> None:
    """What counts as a number on a page, and what matches it in a results folder."""
    block = Block("x", 1, "text", "", [])
    block.text = (
        "layer4 and Lite0 at r0.9 on ResNet-50 with 1e-3: 2.3x faster, 1,764 s, 93.5 % and 0.994 "
        "(`--rounds 30`, [link](#a-1)), p < 0.001"
    )
    assert numbers_in(block) == ["2.3", "1,764", "93.5", "0.994", "<0.001"]
    folder = "benchmarks/results"  # any existing folder works for the arithmetic below
    values = values_in(folder)
    assert values.size > 0
    lone = float(values[len(values) // 2])
    assert found(f"{lone:.3f}", {folder})
    assert not found("123456789.125", {folder})


def test_write_run_records_command_commit_machine_and_figures(tmp_path: Path) -> None:
    import importlib.util
    import time

    spec = importlib.util.spec_from_file_location("bench_common", ROOT / "benchmarks" / "common.py")
    assert spec is not None and spec.loader is not None
    common = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(common)
    started = time.perf_counter()
    out = common.write_run(tmp_path / "x", {"auroc": np.float64(0.5), "n": np.int64(3)}, started, extra={"k": 1})
    assert json.loads((out / "results.json").read_text()) == {"auroc": 0.5, "n": 3}
    run = json.loads((out / "run.json").read_text())
    assert run["command"].startswith("python ") and run["k"] == 1
    assert set(run["git"]) >= {"commit", "dirty"} and run["wall_seconds"] >= 0
    assert {"cpu", "cores", "memory_gb", "torch", "torchvision", "flwr", "gpu"} <= set(run["machine"])
    assert run["date"] >= run["started"]
    # a time.time() start works too
    run = json.loads((common.write_run(tmp_path / "y", None, time.time() - 2.0) / "run.json").read_text())
    assert 1.5 < run["wall_seconds"] < 60 and not (tmp_path / "y" / "results.json").exists()
