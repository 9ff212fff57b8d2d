"""A pip-installed wheel has its recipes (issue #28): built from this checkout, installed into a fresh
virtual environment, and run from outside the repository, where `matvlm distill tiny-default` can only
find the recipe inside the installed package."""

import importlib.util
import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


def run(*args, cwd=None, env=None):
    result = subprocess.run([str(a) for a in args], capture_output=True, text=True, cwd=cwd, env=env)
    assert result.returncode == 0, f"{args}:\n{result.stdout}\n{result.stderr}"
    return result


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """(the venv's bin folder, an environment without this checkout on PYTHONPATH) with the wheel installed."""
    if importlib.util.find_spec("setuptools") is None:
        pytest.skip("building the wheel offline (--no-build-isolation) needs setuptools in this environment")
    tmp = tmp_path_factory.mktemp("wheel")
    # Build from a copy, so that the build leaves no build/ or egg-info in the checkout.
    source = tmp / "source"
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source / name)
    shutil.copytree(ROOT / "matvlm_cli", source / "matvlm_cli", ignore=shutil.ignore_patterns("__pycache__"))
    run(sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", tmp / "dist", source)
    (wheel,) = (tmp / "dist").glob("matvlm-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "matvlm_cli/recipes/shipped/tiny-default.yaml" in names and "matvlm_cli/recipes/distill.py" in names
    assert "matvlm_cli/kernels/autotune-sm90.json" in names  # the Hopper autotune shortlists (kernels/shortlists.py)

    # A venv without pip whose dependencies are this environment's (a .pth line: no download, and no
    # editable finder, whose .pth is not read from there); pip installs the wheel into it from outside.
    venv = tmp / "venv"
    run(sys.executable, "-m", "venv", "--without-pip", venv)
    python = venv / "bin" / "python"
    site = run(python, "-c", "import sysconfig; print(sysconfig.get_path('purelib'))").stdout.strip()
    Path(site, "deps-from-the-test-environment.pth").write_text(sysconfig.get_path("purelib") + "\n")
    run(sys.executable, "-m", "pip", "--python", python, "install", "-q", "--no-deps", "--no-index", wheel)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    return venv / "bin", env, tmp


def test_the_installed_wheel_is_imported_and_lists_its_recipes(installed):
    bin_dir, env, tmp = installed
    where = run(bin_dir / "python", "-c", "import matvlm_cli; print(matvlm_cli.__file__)", cwd=tmp, env=env).stdout
    assert where.startswith(str(bin_dir.parent)) and str(ROOT) not in where
    listing = " ".join(run(bin_dir / "matvlm", "recipes", cwd=tmp, env=env).stdout.split())
    assert "tiny-default distill" in listing and "convert-tiny-0.25 convert" in listing
    run(bin_dir / "matvlm", "recipes", "cp", "tiny-default", tmp, cwd=tmp, env=env)
    assert (tmp / "tiny-default.yaml").read_text() == (ROOT / "recipes" / "tiny-default.yaml").read_text()


def test_the_installed_wheel_distils_a_shipped_recipe_by_name(installed):
    bin_dir, env, tmp = installed
    out = tmp / "run"
    run(bin_dir / "matvlm", "distill", "tiny-default", "--set", "training.max_steps=2", "--set", "training.batch_size=2",
        "--set", "optimizer.warmup_steps=0", "--set", "optimizer.decay_steps=0", "--set", f"output.dir={out}",
        cwd=tmp, env=env)
    assert (out / "final" / "config.json").is_file() and (out / "log.jsonl").is_file()
