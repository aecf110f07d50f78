"""Every `ovseg ...` command quoted in README.md and docs/*.md parses with the real CLI, and every
relative link leads somewhere (scripts/check_docs_commands.py)."""
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
import check_docs_commands as cdc

def test_readme_and_docs_commands_parse_and_links_resolve(capsys):
    assert cdc.main([]) == 0, capsys.readouterr().out

def test_docs_quote_commands_of_every_subcommand():
    # the extractor must find the commands, or the check above proves nothing
    cmds = [c for md in cdc.doc_files([]) for _, c in cdc.quoted_commands(md.read_text())]
    for sub in ("segment", "eval", "train"):
        assert any(c.startswith(f"ovseg {sub} ") for c in cmds), sub
    assert len(cmds) >= 10

def test_bad_commands_and_links_are_reported(tmp_path, capsys):
    md = tmp_path / "bad.md"
    md.write_text("```bash\novseg segment a.png --classes x --out o --colour red\novseg trian --out x\n"
                  "ovseg eval imgs labs --classes x --stride abc\n```\n"
                  "See `ovseg train --epochs 3 --out d` and [x](nowhere.md), [y](bad.md#no-such-heading).\n")
    assert cdc.main([str(md)]) == 1
    out = capsys.readouterr().out
    for needle in ("--colour", "unknown subcommand 'trian'", "--stride", "--epochs", "missing", "#no-such-heading"):
        assert needle in out, (needle, out)


def test_no_project_file_cites_documents_users_do_not_have():
    "Docs, notebooks, settings and code cite official sources (repo@commit:file:line) or the project's own docs."
    import re
    from pathlib import Path
    root = Path(__file__).resolve().parents[1]
    files = [*root.glob("*.md"), *root.glob("docs/*.md"), *root.glob("nbs/*.ipynb"), *root.glob("repro/*.ipynb"),
             root / "params.yaml", *root.glob("scripts/*.py"), *root.glob("tests/*.py"), *root.glob("benchmarks/*.py"),
             *root.glob("ovseg/*.py"), *root.glob("repro/*.json"), root / "nbs" / "llms.txt"]
    bad = [f"{f.relative_to(root)}" for f in files if f.name != "test_docs.py"
           and re.search(r"METHODS\.md|METHODS §|DESIGN\.md|STYLE\.md|DEVELOPERS\.md", f.read_text())]
    assert not bad, bad


def test_readme_images_are_in_the_repository():
    "Every image the README shows is a committed file: someone browsing the repository sees it before running anything."
    import re, subprocess
    from pathlib import Path
    root = Path(__file__).resolve().parents[1]
    imgs = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", (root / "README.md").read_text())
    assert imgs
    tracked = set(subprocess.run(["git", "ls-files"], cwd=root, capture_output=True, text=True).stdout.split())
    missing = [i for i in imgs if not (root / i).is_file() or (tracked and i not in tracked)]
    assert not missing, missing
