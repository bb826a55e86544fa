"""The README, followed top to bottom by a newcomer: every block runs, in the order printed, in
one fresh folder (holding what a clone holds: ``docs/``), and the links of the README and of
``docs/*.md`` resolve.

Blocks: ```python runs as a script (or, after ``<!-- readme-test: save NAME -->``, is saved as
NAME for a later command); ```bash runs with ``bash -e``; ```console runs each ``$ `` line, and
``$ echo $?`` followed by a number checks the previous command's exit status (any other command
must exit 0). ```text and bare ``` blocks are output. ``<!-- readme-test: skip REASON -->``
skips the next block, and the reason is reported.
"""
from __future__ import annotations

import os
import re
import shutil
import stat
import subprocess
import sys

import pytest
from conftest import ROOT

README = os.path.join(ROOT, "README.md")
MARKER = re.compile(r"<!--\s*readme-test:\s*(\w+)\s*(.*?)\s*-->")
FENCE = re.compile(r"^```(\w*)\s*$")


def blocks(path: str) -> list[tuple[int, str, str, tuple[str, str] | None]]:
    """(line number, language, body, marker) of every fenced block in ``path``."""
    lines = open(path, encoding="utf-8").read().splitlines()
    out, i, marker = [], 0, None
    while i < len(lines):
        m = MARKER.search(lines[i])
        if m:
            marker = (m.group(1), m.group(2))
        f = FENCE.match(lines[i])
        if f:
            j = i + 1
            while not lines[j].startswith("```"):
                j += 1
            out.append((i + 1, f.group(1), "\n".join(lines[i + 1:j]) + "\n", marker))
            marker, i = None, j
        elif lines[i].strip() and not m:
            marker = None
        i += 1
    return out


def _bin(folder: str) -> str:
    """``python``, ``torchkeep`` and ``torchrun`` of this interpreter, first on PATH."""
    b = os.path.join(folder, ".bin")
    os.makedirs(b)
    for name, cmd in (("python", ""), ("torchkeep", "-m torchkeep"),
                      ("torchrun", "-m torch.distributed.run")):
        p = os.path.join(b, name)
        with open(p, "w") as f:
            f.write(f'#!/bin/sh\nexec "{sys.executable}" {cmd} "$@"\n')
        os.chmod(p, os.stat(p).st_mode | stat.S_IEXEC)
    return b


def _console(body: str):
    """(command, expected exit status) of every ``$`` line of a console block."""
    lines = body.splitlines()
    cmds = [(k, line[2:]) for k, line in enumerate(lines) if line.startswith("$ ")]
    for n, (k, cmd) in enumerate(cmds):
        if cmd.strip() == "echo $?":
            continue
        want = 0
        nxt = cmds[n + 1] if n + 1 < len(cmds) else None
        if nxt and nxt[1].strip() == "echo $?" and nxt[0] + 1 < len(lines):
            want = int(lines[nxt[0] + 1].strip())
        yield cmd, want


@pytest.mark.slow
def test_readme_runs_top_to_bottom(tmp_path):
    work = str(tmp_path)
    shutil.copytree(os.path.join(ROOT, "docs"), os.path.join(work, "docs"),
                    ignore=shutil.ignore_patterns("api"))
    env = dict(os.environ, PYTHONPATH=os.path.join(ROOT, "src"),
               PATH=_bin(work) + os.pathsep + os.environ.get("PATH", ""))
    skipped, log = [], []

    def run(argv, what, want=0, timeout=900):
        p = subprocess.run(argv, cwd=work, env=env, capture_output=True, text=True, timeout=timeout)
        log.append(f"### {what}\n{p.stdout}{p.stderr}")
        assert p.returncode == want, (f"{what}: exit {p.returncode}, expected {want}\n"
                                      f"{p.stdout[-3000:]}\n{p.stderr[-3000:]}")

    try:
        for line, lang, body, marker in blocks(README):
            kind, arg = marker or ("", "")
            if kind == "skip":
                skipped.append(f"README.md:{line}: {arg}")
                continue
            if kind == "save":
                with open(os.path.join(work, arg), "w") as f:
                    f.write(body)
                continue
            if lang == "python":
                script = os.path.join(work, f"_readme_{line}.py")
                with open(script, "w") as f:
                    f.write(body)
                run([sys.executable, script], f"README.md:{line} (python)")
            elif lang == "bash":
                run(["bash", "-e", "-c", body], f"README.md:{line} (bash)")
            elif lang == "console":
                for cmd, want in _console(body):
                    run(["bash", "-c", cmd], f"README.md:{line}: $ {cmd}", want)
    finally:
        if os.environ.get("README_TEST_LOG"):
            with open(os.environ["README_TEST_LOG"], "w") as f:
                f.write("\n".join(log))
    for s in skipped:
        print("skipped", s)
    assert all(": " in s and s.split(": ", 1)[1] for s in skipped), "a skip without a reason"


# -- links ------------------------------------------------------------------------------------

LINK = re.compile(r"(?<!!)\[[^\]]*\]\(([^)\s]+)\)|!\[[^\]]*\]\(([^)\s]+)\)")


def _slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to '-'."""
    h = re.sub(r"`", "", heading.strip().lower())
    h = re.sub(r"[^\w\- ]", "", h)
    return h.replace(" ", "-")


def _anchors(path: str) -> set[str]:
    text = open(path, encoding="utf-8").read()
    text = re.sub(r"```.*?```", "", text, flags=re.S)
    return {_slug(m.group(1)) for m in re.finditer(r"^#+\s+(.*)$", text, flags=re.M)}


def _markdown_files() -> list[str]:
    docs = os.path.join(ROOT, "docs")
    return [README] + sorted(os.path.join(docs, f) for f in os.listdir(docs) if f.endswith(".md"))


@pytest.mark.parametrize("path", _markdown_files(), ids=lambda p: os.path.relpath(p, ROOT))
def test_links_resolve(path):
    text = re.sub(r"```.*?```", "", open(path, encoding="utf-8").read(), flags=re.S)
    bad = []
    for m in LINK.finditer(text):
        target = m.group(1) or m.group(2)
        if re.match(r"[a-z]+:", target):          # http(s), mailto: not checked offline
            continue
        file, _, anchor = target.partition("#")
        full = os.path.normpath(os.path.join(os.path.dirname(path), file)) if file else path
        if not os.path.exists(full):
            bad.append(f"{target}: no such file {os.path.relpath(full, ROOT)}")
        elif anchor and full.endswith(".md") and anchor not in _anchors(full):
            bad.append(f"{target}: no heading with anchor #{anchor}")
    assert not bad, f"{os.path.relpath(path, ROOT)}: broken links:\n" + "\n".join(bad)


def test_link_checker_catches_a_broken_link(tmp_path, monkeypatch):
    """The checker is not vacuous: a wrong file and a wrong anchor are both reported."""
    md = tmp_path / "x.md"
    md.write_text("# Title\n[a](nope.md) [b](#no-such) [c](#title)\n")
    with pytest.raises(AssertionError) as e:
        test_links_resolve(str(md))
    assert "nope.md" in str(e.value) and "#no-such" in str(e.value) and "#title" not in str(e.value)
