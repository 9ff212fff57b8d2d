"""Recipes: plain YAML files validated into typed dataclasses, in one place.

Every subcommand's settings are one dataclass here. `load_recipe` reads YAML, applies overrides
(CLI flags or `key=value` strings) and checks every key and type, collecting all problems into a
single error before any model is loaded.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .errors import MatvlmError


@dataclass
class ConvertRecipe:
    """`matvlm convert`: which teacher, which layers, where to write the hybrid."""

    teacher: str | None = None  # a local model directory; None = the embedded default
    output: str | None = None  # default: ./<teacher name>-hybrid-<ratio>-<placement>
    ratio: float | None = 0.25
    placement: str = "even"
    layers: list[int] | None = None  # explicit indices; overrides ratio/placement
    keep_bias: bool = False  # carry q/k/v/o biases into in_proj/out_proj (MaTVLM drops them)
    chunk_size: int = 128
    seed: int = 0
    dtype: str = "auto"  # auto | float32 | bfloat16 | float16
    overwrite: bool = False
    trust_remote_code: bool = False


DTYPES = ("auto", "float32", "bfloat16", "float16")


def _type_ok(value: Any, annotation: Any) -> bool:
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        return any(_type_ok(value, arm) for arm in typing.get_args(annotation))
    if annotation is type(None):
        return value is None
    if origin is list:
        (item,) = typing.get_args(annotation)
        return isinstance(value, list) and all(_type_ok(v, item) for v in value)
    if origin is dict:
        return isinstance(value, dict)
    if annotation is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if annotation is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, annotation)


def _type_name(annotation: Any) -> str:
    return str(annotation).replace("typing.", "").replace("<class '", "").replace("'>", "")


def build_recipe(cls, values: dict[str, Any], source: str = "recipe"):
    """Validate `values` against dataclass `cls`; raise one MatvlmError listing every problem."""
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    problems = [f"unknown key '{key}'" for key in values if key not in known]
    for key, value in values.items():
        if key in known and not _type_ok(value, hints[key]):
            problems.append(f"'{key}' must be {_type_name(hints[key])}, got {value!r}")
    if problems:
        raise MatvlmError(f"{source}: " + "; ".join(problems))
    return cls(**{k: (float(v) if hints[k] in (float, float | None) and isinstance(v, int) else v) for k, v in values.items()})


def read_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise MatvlmError(f"{path}: recipe file not found")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f":{mark.line + 1}" if mark is not None else ""
        raise MatvlmError(f"{path}{where}: not valid YAML ({getattr(err, 'problem', err)})") from None
    if not isinstance(data, dict):
        raise MatvlmError(f"{path}: a recipe must be a mapping of keys to values")
    return data


def parse_override(text: str) -> tuple[str, Any]:
    """`key=value`, with the value read as YAML (so numbers, lists and booleans work)."""
    if "=" not in text:
        raise MatvlmError(f"override {text!r}: expected key=value")
    key, raw = text.split("=", 1)
    return key.strip(), yaml.safe_load(raw)


def load_recipe(cls, path: str | Path | None = None, overrides: dict[str, Any] | None = None):
    values = read_yaml(path) if path else {}
    values.update({k: v for k, v in (overrides or {}).items() if v is not None})
    return build_recipe(cls, values, source=str(path) if path else "options")


def save_recipe(recipe, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(dataclasses.asdict(recipe), sort_keys=False))
