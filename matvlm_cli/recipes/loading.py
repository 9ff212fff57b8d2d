"""Reading and validating recipes, for every subcommand: YAML in, a typed dataclass out.

`load_recipe` layers a recipe's values (defaults < recipe file < command-line flags < `--set key=value`),
checks every key and type, then the recipe's own `check`, collecting all problems into a single error
that names the file, flag or --set each came from, before any model is loaded. A recipe field's help
text and command-line flag live in its metadata (`setting`), so the CLI reads them from here.
"""

from __future__ import annotations

import dataclasses
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from ..choices import choices_in, is_choice
from ..errors import MatvlmError


def setting(default: Any = dataclasses.MISSING, help: str = "", *, factory: Any = dataclasses.MISSING,
            flag: str | None = None, shown: str | None = None):
    """A recipe field with its help text, and its command-line flag where that is not `--field-name`
    (`--student` for `students`); `shown` is the default as help shows it where the value would mislead
    (None, which stands for something chosen at run time)."""
    return field(default=default, default_factory=factory, metadata={"help": help, "flag": flag, "shown": shown})


def flag_of(cls, key: str) -> str:
    """The command-line flag that sets top-level `key` of recipe class `cls`."""
    meta = {f.name: f.metadata for f in dataclasses.fields(cls)}.get(key, {})
    return meta.get("flag") or "--" + key.replace("_", "-")


def _type_ok(value: Any, annotation: Any) -> bool:
    if is_choice(annotation):  # the type here; whether it is one of the choices is the recipe's check
        return any(isinstance(value, type(arg)) for arg in typing.get_args(annotation))
    if dataclasses.is_dataclass(annotation):
        return isinstance(value, dict)
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
    if is_choice(annotation):
        return " | ".join(sorted({type(arg).__name__ for arg in typing.get_args(annotation)}))
    if choices_in(annotation):  # `Trainable | None` reads `str | None`, `list[Engine]` reads `list[str]`
        if typing.get_origin(annotation) is list:
            return f"list[{_type_name(typing.get_args(annotation)[0])}]"
        return " | ".join("None" if arm is type(None) else _type_name(arm) for arm in typing.get_args(annotation))
    return str(annotation).replace("typing.", "").replace("<class '", "").replace("'>", "")


def _nested_class(annotation: Any):
    """The dataclass inside `X`, `X | None` or `list[X]`, and whether it is a list."""
    if dataclasses.is_dataclass(annotation):
        return annotation, False
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    if typing.get_origin(annotation) is list and args and dataclasses.is_dataclass(args[0]):
        return args[0], True
    if len(args) == 1:
        return _nested_class(args[0])
    return None, False


def _collect(cls, values: dict[str, Any], prefix: str, problems: list[str]):
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    problems += [f"unknown key '{prefix}{key}'" for key in values if key not in known]
    built = {}
    for key, value in values.items():
        if key not in known:
            continue
        nested, is_list = _nested_class(hints[key])
        if nested is not None and value is not None:
            if is_list and isinstance(value, list) and all(isinstance(v, dict) for v in value):
                built[key] = [_collect(nested, v, f"{prefix}{key}[{i}].", problems) for i, v in enumerate(value)]
                continue
            if not is_list and isinstance(value, dict):
                built[key] = _collect(nested, value, f"{prefix}{key}.", problems)
                continue
        if not _type_ok(value, hints[key]):
            problems.append(f"'{prefix}{key}' must be {_type_name(hints[key])}, got {value!r}")
            continue
        built[key] = float(value) if hints[key] in (float, float | None) and isinstance(value, int) else value
    try:
        return cls(**built)
    except TypeError as err:  # a required field without a value
        problems.append(f"{prefix.rstrip('.') or 'recipe'}: {err}")
        return None


@dataclass
class RecipeSource:
    """Where a recipe's values came from: the recipe file, and the command-line options that set keys
    over it (`--seq-len`, `--set training.epochs=0`), so that a problem names what the user typed."""

    file: str | None = None
    options: dict[str, str] = field(default_factory=dict)  # dotted key -> the option that set it

    def __str__(self) -> str:
        return self.file or "options"


# Every problem names the keys it is about in single quotes ('training.epochs'), which is how
# `problems_error` finds the option that set them.
_QUOTED_KEY = re.compile(r"'([A-Za-z_][\w.\[\]]*)'")


def _related(key: str, option_key: str) -> bool:
    """Whether a problem about `key` can come from the option that set `option_key` (the same key, a key
    inside it, or the section holding it)."""
    return key == option_key or key.startswith((option_key + ".", option_key + "[")) or option_key.startswith(key + ".")


def _attribute(problem: str, source: RecipeSource) -> tuple[str | None, str]:
    """(the prefix that says where, the problem's text) for one problem."""
    for key in _QUOTED_KEY.findall(problem):
        for option_key, option in source.options.items():
            if not _related(key, option_key):
                continue
            if key == option_key and not option.startswith("--set "):  # name the flag itself: '--seq-len: 0 ...'
                return None, problem.replace(f"'{key}'", option, 1)
            return option, problem
    return str(source), problem


def problems_error(problems: list[str], source: str | RecipeSource) -> MatvlmError:
    """One MatvlmError for every problem, each under the file, flag or --set its value came from."""
    source = source if isinstance(source, RecipeSource) else RecipeSource(source)
    grouped: dict[str | None, list[str]] = {}
    for problem in problems:
        where, text = _attribute(problem, source)
        grouped.setdefault(where, []).append(text)
    return MatvlmError("; ".join((f"{where}: " if where else "") + "; ".join(texts) for where, texts in grouped.items()))


def build_recipe(cls, values: dict[str, Any], source: str | RecipeSource = "recipe"):
    """Validate `values` against dataclass `cls`; raise one MatvlmError listing every problem."""
    problems: list[str] = []
    recipe = _collect(cls, values, "", problems)
    if problems:
        raise problems_error(problems, source)
    return recipe


def set_dotted(values: dict[str, Any], dotted: str, value: Any) -> None:
    """`optimizer.lr=1e-4` style overrides into a nested mapping."""
    *parents, leaf = dotted.split(".")
    for part in parents:
        values = values.setdefault(part, {})
        if not isinstance(values, dict):
            raise MatvlmError(f"override {dotted}: '{part}' is not a section")
    values[leaf] = value


class RecipeLoader(yaml.SafeLoader):
    """PyYAML's safe loader with YAML 1.2's floats: `5e-4` and `1E3` are numbers, as people write them
    (YAML 1.1 wants a dot and a signed exponent, so PyYAML reads those as strings), and unique keys:
    PyYAML keeps the last of two equal keys, so a second `training:` would silently replace the first."""

    def construct_mapping(self, node, deep=False):
        if isinstance(node, yaml.MappingNode):
            first_at: dict[Any, yaml.Node] = {}
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *base` overrides on purpose
                    continue
                key = self.construct_object(key_node, deep=True)
                try:
                    first = first_at.setdefault(key, key_node)
                except TypeError:  # an unhashable key: the base class reports it
                    continue
                if first is not key_node:
                    raise yaml.constructor.ConstructorError(
                        None, None, f"duplicate key {key!r}, first at line {first.start_mark.line + 1}", key_node.start_mark,
                    )
        return super().construct_mapping(node, deep)


RecipeLoader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag != "tag:yaml.org,2002:float"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
# YAML 1.2 core schema floats, less the plain integers its regexp also matches (those stay ints).
RecipeLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"""^(?:[-+]?(?:\.[0-9]+|[0-9]+\.[0-9]*|[0-9]+(?=[eE]))(?:[eE][-+]?[0-9]+)?
                |[-+]?\.(?:inf|Inf|INF)
                |\.(?:nan|NaN|NAN))$""", re.X),
    list("-+0123456789."),
)


def parse_yaml(text: str, where: str) -> Any:
    """YAML with `RecipeLoader`; a syntax error is a MatvlmError naming `where` and the line."""
    try:
        return yaml.load(text, Loader=RecipeLoader)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        line = f":{mark.line + 1}" if mark is not None else ""
        raise MatvlmError(f"{where}{line}: not valid YAML ({getattr(err, 'problem', None) or err})") from None


def read_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise MatvlmError(f"{path}: recipe file not found")
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as err:
        raise MatvlmError(f"{path}: not a text file (byte {err.start} is not UTF-8); a recipe is YAML text") from None
    data = parse_yaml(text, str(path)) or {}
    if not isinstance(data, dict):
        raise MatvlmError(f"{path}: a recipe must be a mapping of keys to values")
    return data


def parse_override(text: str) -> tuple[str, Any]:
    """`key=value`, with the value read as YAML (so numbers, lists and booleans work)."""
    if "=" not in text:
        raise MatvlmError(f"override {text!r}: expected key=value")
    key, raw = text.split("=", 1)
    return key.strip(), parse_yaml(raw, f"override {text!r}")


def load_recipe(cls, path: str | Path | None = None, overrides: dict[str, Any] | None = None, sets: list[str] = (),
                flag_names: dict[str, str] | None = None):
    """The class's defaults, then the recipe file (if any), then `overrides` (dotted key -> the value of a
    command-line flag, None = not given), then `sets` (`--set key=value` texts), validated: its types, and
    the recipe's own `check`. A problem names what set the value it is about: the file, the `--set`, or
    the flag (the field's `setting(flag=...)`, `--key-name`, or the name in `flag_names`)."""
    values = read_yaml(path) if path else {}
    source = RecipeSource(str(path) if path else None)
    for key, value in (overrides or {}).items():
        if value is not None:
            set_dotted(values, key, value)
            source.options[key] = (flag_names or {}).get(key) or flag_of(cls, key)
    for text in sets:
        key, value = parse_override(text)
        set_dotted(values, key, value)
        source.options[key] = f"--set {text}"
    recipe = build_recipe(cls, values, source)
    if hasattr(recipe, "check"):
        recipe.check(source)
    return recipe


def save_recipe(recipe, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(dataclasses.asdict(recipe), sort_keys=False))

