"""The recipes that ship inside the package (`shipped/`, which the repository's `recipes/` links to):
listed by `matvlm recipes`, copied by `matvlm recipes cp`, and named instead of a path
(`matvlm distill tiny-default`)."""

from __future__ import annotations

import re
import shutil
from dataclasses import dataclass
from pathlib import Path

from ..errors import MatvlmError

SHIPPED = Path(__file__).parent / "shipped"
# A shipped recipe's first line says how to run it: `# matvlm distill recipes/x.yaml` or
# `# accelerate launch -m matvlm_cli distill recipes/x.yaml`.
_COMMAND = re.compile(r"\bmatvlm(?:_cli)?\s+([a-z]+)\b")


@dataclass
class ShippedRecipe:
    name: str
    path: Path
    command: str  # the subcommand it is for
    description: str  # the first sentence of its header comment (the command line left out)


def _describe(path: Path) -> ShippedRecipe:
    comments = []
    for line in path.read_text().splitlines():
        if not line.startswith("#"):
            break
        comments.append(line.lstrip("#").strip())
    command = next((m.group(1) for m in map(_COMMAND.search, comments) if m), "?")
    prose = " ".join(c for c in comments if not _COMMAND.search(c))
    return ShippedRecipe(path.stem, path, command, _first_sentence(prose))


def _first_sentence(text: str, most: int = 72) -> str:
    sentence = re.split(r"(?<=\.)\s", text, maxsplit=1)[0]
    return sentence if len(sentence) <= most else sentence[:most].rsplit(" ", 1)[0] + " …"


def shipped_recipes() -> list[ShippedRecipe]:
    return [_describe(path) for path in sorted(SHIPPED.glob("*.yaml"))]


def shipped_recipe(name: str) -> Path:
    path = SHIPPED / f"{name}.yaml"
    if not path.is_file():
        names = ", ".join(r.name for r in shipped_recipes())
        raise MatvlmError(f"{name}: no shipped recipe of that name (there are: {names}; `matvlm recipes` lists them)")
    return path


def resolve_recipe(recipe: str | Path | None) -> Path | None:
    """A recipe argument as a path: the file it names, or, where no such file exists and it is a bare name
    (no folder, no .yaml), the shipped recipe of that name."""
    if recipe is None:
        return None
    path = Path(recipe)
    if not path.exists() and path.name == str(recipe) and not path.suffix and (SHIPPED / f"{recipe}.yaml").is_file():
        return SHIPPED / f"{recipe}.yaml"
    return path


def copy_recipe(name: str, destination: str | Path) -> Path:
    """`matvlm recipes cp NAME DEST`: into DEST (a folder) as NAME.yaml, or as the file DEST; never over a file."""
    source = shipped_recipe(name)
    target = Path(destination)
    if target.is_dir():
        target = target / source.name
    if target.exists():
        raise MatvlmError(f"{target}: already exists (matvlm recipes cp never replaces a file)")
    if not target.parent.is_dir():
        raise MatvlmError(f"{target.parent}: no such folder")
    shutil.copyfile(source, target)
    return target
