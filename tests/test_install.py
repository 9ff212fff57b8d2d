"""The install the README's commands make: constraints.txt pins a set that pyproject.toml's ranges admit,
and every range is capped (a new major or minor release reaches users only after `make test-latest`)."""

import re
from pathlib import Path

import tomllib
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[1]


def _requirements() -> list[Requirement]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    extras = project["optional-dependencies"]
    return [Requirement(r) for r in project["dependencies"] + extras["test"] + extras["app"]]


def _pins() -> dict[str, str]:
    pins = {}
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            name, version = re.fullmatch(r"([A-Za-z0-9_.\-]+)==(\S+)", line.strip()).groups()
            pins[canonicalize_name(name)] = version
    return pins


def test_every_dependency_is_pinned_within_its_range():
    pins = _pins()
    for requirement in _requirements():
        name = canonicalize_name(requirement.name)
        if name == "torch":  # the Makefile installs torch itself: the CPU build here, a CUDA build on a GPU
            continue
        assert name in pins, f"{name} is not pinned in constraints.txt"
        assert requirement.specifier.contains(pins[name]), f"constraints.txt pins {name}=={pins[name]}, outside {requirement}"


def test_every_range_is_capped():
    for requirement in _requirements():
        assert any(spec.operator in ("<", "<=") for spec in requirement.specifier), f"{requirement} has no upper bound"


def test_the_makefile_installs_with_the_constraints():
    makefile = (ROOT / "Makefile").read_text()
    assert re.search(r"pip install -q -c constraints\.txt -e \"\.\[test,app\]\"", makefile)


def test_the_makefiles_torch_is_pyprojects_range():
    """The Makefile installs torch itself (the CPU build pinned, or on a GPU machine a CUDA build within
    pyproject's range): its range is pyproject's, and its pin inside it, so raising the cap in one place
    and not the other fails here."""
    (torch,) = [r for r in _requirements() if canonicalize_name(r.name) == "torch"]
    gpu, cpu = re.search(r"^TORCH := \$\(if \$\(HAVE_GPU\),(\S+?),torch==(\S+)\)$", (ROOT / "Makefile").read_text(), re.M).groups()
    assert Requirement(gpu.replace("$(COMMA)", ",")).specifier == torch.specifier
    assert torch.specifier.contains(cpu)
