#!/usr/bin/env python
"""Check the README and docs/*.md against the code they describe.

1. Every `ovseg ...` command quoted (in a code block or an inline code span) names a real
   subcommand, uses only flags that subcommand has, and -- when it is a concrete command, not a
   synopsis with `[...]` or `...` -- parses with the CLI's own argument parser (nothing is run).
   `ovseg SUB --help` must work for every subcommand quoted.
2. Every relative link ([text](path#anchor)) points to a file that exists and, for a Markdown
   file, to a heading that exists (GitHub's anchor rules). outputs/ is made by `make repro`, so
   links into it are not checked.

Usage: scripts/check_docs_commands.py [FILE.md ...]   (default: README.md docs/*.md); exit 1 on problems.
"""
from __future__ import annotations
import argparse, contextlib, io, re, shlex, subprocess, sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

def doc_files(args: list[str]) -> list[Path]:
    return [Path(a) for a in args] if args else [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]

def quoted_commands(text: str) -> list[tuple[int, str]]:
    "(line number, command) for each `ovseg ...` in fenced blocks (continuation lines joined) and inline spans."
    out, lines, i, fence = [], text.splitlines(), 0, False
    while i < len(lines):
        line = lines[i]
        if line.lstrip().startswith("```"):
            fence = not fence; i += 1; continue
        if fence:
            m = re.match(r"\s*(?:\$ )?(?:python -m )?(ovseg(?: .*)?)$", line)
            if m:
                cmd, start = m.group(1), i + 1
                while cmd.rstrip().endswith("\\") or (i + 1 < len(lines) and re.match(r"\s+[\[-]", lines[i + 1])):
                    cmd = cmd.rstrip().rstrip("\\") + " " + lines[i + 1].strip(); i += 1
                out.append((start, cmd.split("  #")[0].split(" # ")[0].strip()))
        else:
            for m in re.finditer(r"`(?:python -m )?(ovseg(?: [^`]*)?)`", line):
                out.append((i + 1, m.group(1).strip()))
        i += 1
    return out

def _subparsers(p: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    acts = [a for a in p._actions if isinstance(a, argparse._SubParsersAction)]
    return dict(acts[0].choices) if acts else {}

def _flags(p: argparse.ArgumentParser) -> set[str]:
    return {s for a in p._actions for s in a.option_strings}

def check_command(cmd: str, parser: argparse.ArgumentParser) -> str | None:
    "A problem with one quoted command, or None."
    try: toks = shlex.split(cmd)[1:]
    except ValueError as e: return f"cannot split: {e}"
    subs = _subparsers(parser)
    if not toks or toks[0] in ("-h", "--help", "--version"): return None
    if toks[0] in ("...", "|", "COMMAND"): return None            # prose like `ovseg ...`
    if toks[0].startswith("-"):
        flag = toks[0].split("=")[0]
        return None if flag in _flags(parser) else f"unknown option {flag}"
    if "|" in toks[0]:                                            # `ovseg segment | eval | train`
        names = [t for t in re.split(r"[\s|]+", cmd[len("ovseg"):]) if t]
        bad = [n for n in names if n not in subs]
        return f"unknown subcommand(s) {bad}" if bad else None
    sub = toks[0]
    if sub not in subs: return f"unknown subcommand {sub!r} (have: {', '.join(subs)})"
    sp = subs[sub]
    if len(toks) == 1: return None                                # the subcommand named in prose
    bad = [t.split("=")[0] for t in toks[1:] if re.match(r"\[?--?[a-zA-Z]", t)
           and t.lstrip("[").split("=")[0].rstrip("]") not in _flags(sp)]
    if bad: return f"`ovseg {sub}` has no option(s) {', '.join(b.lstrip('[') for b in bad)}"
    synopsis = any(c in cmd for c in "[]") or "..." in cmd or "…" in cmd or re.search(r"\b[A-Z_]{3,}\b", cmd)
    if not synopsis:
        err = io.StringIO()
        try:
            with contextlib.redirect_stderr(err): sp.parse_args(toks[1:])
        except SystemExit as e:
            if e.code: return "does not parse: " + (err.getvalue().strip().splitlines() or ["?"])[-1]
    return None

def slug(heading: str) -> str:
    "GitHub's anchor for a Markdown heading."
    h = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return h.replace(" ", "-")

def anchors(md: Path) -> set[str]:
    text, fence, out = md.read_text(), False, set()
    for line in text.splitlines():
        if line.lstrip().startswith("```"): fence = not fence
        elif not fence and (m := re.match(r"#{1,6}\s+(.*)", line)): out.add(slug(m.group(1)))
    return out

def check_links(md: Path) -> list[str]:
    problems, fence = [], False
    for n, line in enumerate(md.read_text().splitlines(), 1):
        if line.lstrip().startswith("```"): fence = not fence; continue
        if fence: continue
        for m in re.finditer(r"\]\(([^)\s]+)\)", line):
            target = m.group(1)
            if re.match(r"[a-z]+:", target) or target.startswith("<"): continue   # http(s), mailto
            path, _, anchor = target.partition("#")
            dest = (md.parent / path).resolve() if path else md
            try: rel = dest.relative_to(ROOT)
            except ValueError: rel = dest
            if str(rel).startswith("outputs/"): continue
            if not dest.exists(): problems.append(f"{md.name}:{n}: link to missing {rel}"); continue
            if anchor and dest.suffix == ".md" and anchor not in anchors(dest):
                problems.append(f"{md.name}:{n}: no heading #{anchor} in {rel}")
    return problems

def main(argv: list[str] | None = None) -> int:
    sys.path.insert(0, str(ROOT))
    from ovseg.cli import _parser
    parser, problems, subs_seen, n = _parser(), [], set(), 0
    for md in doc_files(sys.argv[1:] if argv is None else argv):
        for line, cmd in quoted_commands(md.read_text()):
            n += 1
            if (err := check_command(cmd, parser)): problems.append(f"{md.name}:{line}: `{cmd}`: {err}")
            toks = cmd.split()
            if len(toks) > 1 and toks[1] in _subparsers(parser): subs_seen.add(toks[1])
        problems += check_links(md)
    for sub in sorted(subs_seen):
        r = subprocess.run([sys.executable, "-m", "ovseg", sub, "--help"], capture_output=True, text=True, cwd=ROOT)
        if r.returncode: problems.append(f"`ovseg {sub} --help` exits {r.returncode}: {r.stderr.strip()[-300:]}")
    if problems:
        print("\n".join(problems)); return 1
    print(f"ok: {n} quoted ovseg commands parse ({', '.join(sorted(subs_seen))} --help work); links resolve")
    return 0

if __name__ == "__main__":
    sys.exit(main())
