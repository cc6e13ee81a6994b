"""The documentation stays true to the code: README.md is a front page of at most 200 lines; no page carries a path a
user does not have or a work note; every relative link (and its #anchor) resolves; every flag docs/cli.md names
exists and every flag of every command is named there; each ``aam-fast COMMAND`` line of an example uses only that
command's flags and parses; and every ``python`` code block of README.md and docs/ runs.

The flags come from the parsers themselves, built in this process (``aam_fast.cli.build_parser``). Code blocks that
are not meant to run (signatures) are fenced as ``text``, not ``python``."""

from __future__ import annotations

import argparse
import re
import shlex
from functools import cache
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
CLI_PAGE = ROOT / "docs" / "cli.md"
PAGES = [README, *sorted((ROOT / "docs").glob("*.md"))]
README_MAX_LINES = 200

# Paths only this project's developers have, and notes about the work rather than the software.
WORK_NOTES = {
    r"\.\./shared": "a ../shared path (use a user's own path, e.g. pairs.jsonl)",
    r"/work/": "a /work/ path",
    r"\bissue\s*#?\d+": "an issue number",
    r"\bthe issue\b": "a reference to an issue",
    r"\bthis machine\b": "'this machine' (name the hardware)",
    r"\bthe 2-core machine\b": "'the 2-core machine' (name the hardware)",
    r"\bhas been lent\b": "a note about lent hardware",
}

FENCE = re.compile(r"^```([\w-]*)\n(.*?)^```", re.MULTILINE | re.DOTALL)
INLINE_CODE = re.compile(r"`[^`\n]*`")
LINK = re.compile(r"!?\[[^\]\n]*\]\(([^()\s]+)\)")
FLAG = re.compile(r"(?<![\w-])--[a-z][a-z0-9-]*")
COMMAND = re.compile(r"(?:\baam-fast|-m aam_fast)\s+([a-z][a-z-]*)(.*)")


def page_id(path: Path) -> str:
    return str(path.relative_to(ROOT))


def code_blocks(text: str, language: str | None = None) -> list[str]:
    return [body for lang, body in FENCE.findall(text) if language is None or lang == language]


def prose(text: str) -> str:
    """``text`` without fenced code blocks."""
    return FENCE.sub("", text)


def github_slug(heading: str) -> str:
    """The anchor GitHub gives a heading: lower case, punctuation dropped (word characters, '-' and spaces kept),
    spaces as '-'."""
    text = heading.strip().lower().replace("`", "")
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


@cache
def anchors(path: Path) -> frozenset[str]:
    seen: dict[str, int] = {}
    found = set()
    for line in prose(path.read_text()).splitlines():
        match = re.match(r"#{1,6}\s+(.*)", line)
        if not match:
            continue
        slug = github_slug(match.group(1))
        count = seen.get(slug, 0)
        seen[slug] = count + 1
        found.add(slug if count == 0 else f"{slug}-{count}")
    return frozenset(found)


@cache
def cli_parser() -> argparse.ArgumentParser:
    from aam_fast.cli import build_parser

    return build_parser()


@cache
def command_flags() -> dict[str, frozenset[str]]:
    """``{command: its long options}`` from the real parser of every ``aam-fast`` command."""
    (subparsers,) = [a for a in cli_parser()._actions if isinstance(a, argparse._SubParsersAction)]
    return {
        name: frozenset(o for a in sub._actions for o in a.option_strings if o.startswith("--") and o != "--help")
        for name, sub in subparsers.choices.items()
    }


def test_readme_is_a_front_page():
    lines = README.read_text().splitlines()
    assert len(lines) <= README_MAX_LINES, f"README.md has {len(lines)} lines; the reference belongs in docs/"


@pytest.mark.parametrize("page", PAGES, ids=page_id)
def test_no_work_notes_or_private_paths(page):
    text = page.read_text()
    found = [f"{why}: {m.group(0)!r}" for pattern, why in WORK_NOTES.items() for m in re.finditer(pattern, text, re.I)]
    assert not found, f"{page_id(page)}: " + "; ".join(found)


@pytest.mark.parametrize("page", PAGES, ids=page_id)
def test_relative_links_resolve(page):
    broken = []
    for target in LINK.findall(INLINE_CODE.sub("", prose(page.read_text()))):
        if re.match(r"[a-z][a-z+.-]*:", target):  # https:, mailto:
            continue
        path_part, _, anchor = target.partition("#")
        path = (page.parent / path_part).resolve() if path_part else page
        if not path.exists():
            broken.append(f"{target}: no such file")
        elif anchor and path.suffix == ".md" and anchor not in anchors(path):
            broken.append(f"{target}: no heading with anchor #{anchor}")
    assert not broken, f"{page_id(page)}: " + "; ".join(broken)


def test_every_flag_named_in_cli_page_exists():
    known = frozenset().union(*command_flags().values())
    spans = [span.strip("`") for span in INLINE_CODE.findall(prose(CLI_PAGE.read_text()))]
    named = {flag for span in spans if span.startswith("--") for flag in FLAG.findall(span)}
    assert not named - known, f"docs/cli.md names flags no command has: {sorted(named - known)}"


def test_every_flag_is_documented_in_cli_page():
    documented = set(FLAG.findall(CLI_PAGE.read_text()))
    missing = []
    for command, flags in sorted(command_flags().items()):
        for flag in sorted(flags):
            negated = flag.startswith("--no-") and "--" + flag[len("--no-") :] in flags
            if not negated and flag not in documented:
                missing.append(f"{command} {flag}")
    assert not missing, f"flags missing from docs/cli.md: {', '.join(missing)}"


def example_commands(page: Path) -> list[tuple[str, list[str]]]:
    """``(command, arguments)`` of every ``aam-fast COMMAND ...`` line (continuations joined) in ``page``'s code."""
    found = []
    for block in code_blocks(page.read_text()):
        for line in block.replace("\\\n", " ").splitlines():
            match = COMMAND.search(re.sub(r"(^|\s)#.*", "", line))
            if match:
                found.append((match.group(1), shlex.split(match.group(2))))
    return found


@pytest.mark.parametrize("page", PAGES, ids=page_id)
def test_command_examples_use_their_commands_flags(page):
    flags = command_flags()
    wrong = []
    for command, arguments in example_commands(page):
        if command not in flags:
            wrong.append(f"no command {command!r}")
            continue
        wrong += [f"{command} {arg}" for arg in arguments if FLAG.fullmatch(arg) and arg not in flags[command]]
        try:
            cli_parser().parse_args([command, *arguments])
        except SystemExit:  # argparse printed why on stderr
            wrong.append(f"{command} {' '.join(arguments)}: does not parse")
    assert not wrong, f"{page_id(page)}: " + "; ".join(wrong)


@pytest.mark.parametrize("page", PAGES, ids=page_id)
def test_python_examples_run(page):
    for number, block in enumerate(code_blocks(page.read_text(), "python")):
        exec(compile(block, f"{page_id(page)} python block {number}", "exec"), {"__name__": "__docs__"})
