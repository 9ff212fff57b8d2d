"""Every relative link in README.md, experiments/README.md and docs/**/*.md points at a file or folder that exists."""

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", ROOT / "experiments" / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
LINK = re.compile(r"\]\(([^)\s]+)\)")


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_resolve(page):
    broken = []
    for target in LINK.findall(page.read_text()):
        if re.match(r"[a-z][a-z0-9+.-]*:", target) or target.startswith("#"):
            continue  # a web address or an anchor on the same page
        path = (page.parent / target.split("#")[0]).resolve()
        if not path.exists():
            broken.append(target)
    assert not broken, f"{page.name}: {broken}"


def test_the_readme_is_a_front_door():
    assert len((ROOT / "README.md").read_text().splitlines()) <= 200


def test_every_experiment_script_is_in_the_experiments_index():
    """experiments/README.md links every script in experiments/ and experiments/gpu/, so a newcomer finds what
    made each result (seven were missing until session 20)."""
    folder = ROOT / "experiments"
    linked = {(folder / target).resolve() for target in LINK.findall((folder / "README.md").read_text())}
    scripts = [path for pattern in ("*.py", "*.sh", "gpu/*.py", "gpu/*.sh") for path in folder.glob(pattern)]
    assert len(scripts) > 30
    assert sorted(str(path.relative_to(folder)) for path in scripts if path.resolve() not in linked) == []
