"""Serving exports with vLLM (`matvlm_cli.serve`): what runs without vLLM is checked here (which exports
serve and how, the flags, the weight names, every bad input of `matvlm serve`); what needs vLLM skips
without it (`make serve-check` runs vLLM itself, against transformers, in its own environment)."""

from __future__ import annotations

import importlib.util
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors import safe_open
from tiny import build_tiny_llava

from matvlm_cli.errors import MatvlmError
from matvlm_cli.export import export_hybrid
from matvlm_cli.families import MODEL_FAMILIES, ServeMapping
from matvlm_cli.hybrid import convert_to_hybrid, load_teacher, save_hybrid
from matvlm_cli.hybrid.stock import per_group_gated_norm_available
from matvlm_cli.serve.servable import check_servable, engine_options, serve_arguments

HAVE_VLLM = importlib.util.find_spec("vllm") is not None
needs_vllm = pytest.mark.skipif(not HAVE_VLLM, reason="vLLM is not installed here (make serve-check builds .venv-serve with it)")
# export refuses these hybrids where transformers' gated norm is not per group (5.17-5.22)
needs_per_group_norm = pytest.mark.skipif(
    not per_group_gated_norm_available(), reason="this transformers' GraniteMoeHybrid gated norm is not per group"
)
pytestmark = pytest.mark.usefixtures("one_thread")


def _export(tmp_path_factory, teacher: Path, layers: list[int], name: str) -> Path:
    model = load_teacher(teacher)
    convert_to_hybrid(model, layers)
    hybrid = tmp_path_factory.mktemp(name) / "hybrid"
    save_hybrid(model, hybrid, source=teacher)
    return export_hybrid(hybrid, hybrid.parent / "export")


@pytest.fixture(scope="module")
def llava_export(tmp_path_factory):
    """A tiny random LLaVA (SigLIP tower, Llama text) converted at layer 1 and exported."""
    teacher = build_tiny_llava(tmp_path_factory.mktemp("teacher") / "llava", family="llama", seed=3)
    return _export(tmp_path_factory, teacher, [1], "llava")


def _serve(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "matvlm_cli", "serve", *args], capture_output=True, text=True)


def _snapshot(directory: Path) -> dict[str, bytes]:
    return {str(path.relative_to(directory)): path.read_bytes() for path in sorted(directory.rglob("*")) if path.is_file()}


@needs_per_group_norm
def test_a_llava_export_is_served_by_the_plugin_class_and_the_folder_is_untouched(llava_export):
    before = _snapshot(llava_export)
    plan = check_servable(llava_export)
    assert plan.architecture == "MatvlmLlavaForConditionalGeneration"
    options = engine_options(plan, cpu=True)
    assert options == {"mamba_ssm_cache_dtype": "float32", "enable_prefix_caching": False,
                       "hf_overrides": {"architectures": ["MatvlmLlavaForConditionalGeneration"]}}
    assert "enable_prefix_caching" not in engine_options(plan, cpu=False)  # the crash is the CPU backend's
    assert serve_arguments(plan, cpu=True) == [
        "--mamba-ssm-cache-dtype", "float32", "--no-enable-prefix-caching",
        "--hf-overrides", '{"architectures":["MatvlmLlavaForConditionalGeneration"]}',
    ]
    assert _snapshot(llava_export) == before
    assert json.loads((llava_export / "config.json").read_text())["architectures"] == ["LlavaForConditionalGeneration"]


@needs_per_group_norm
def test_a_text_only_export_is_served_by_vllms_own_class(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    teacher = tmp_path / "teacher"
    LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                 num_attention_heads=2, num_key_value_heads=1)).save_pretrained(teacher)
    model = load_teacher(teacher)
    convert_to_hybrid(model, [1])
    save_hybrid(model, tmp_path / "hybrid", source=teacher)
    plan = check_servable(export_hybrid(tmp_path / "hybrid", tmp_path / "export"))
    assert plan.architecture is None
    assert serve_arguments(plan, cpu=False) == ["--mamba-ssm-cache-dtype", "float32"]


@needs_per_group_norm
def test_the_tower_rename_gives_vllms_names_for_every_saved_tower_weight(llava_export):
    """transformers 5 saves the SigLIP tower flat; vLLM's tower keeps `vision_model.`. The rule must
    reach every tower weight of a real export, leave everything else, and leave a nested name alone."""
    (pattern, replacement), = MODEL_FAMILIES["llava"].serve.renames
    with safe_open(llava_export / "model.safetensors", "pt") as weights:
        names = list(weights.keys())
    tower = [name for name in names if name.startswith("vision_tower.")]
    assert tower and all(re.sub(pattern, replacement, name).startswith("vision_tower.vision_model.") for name in tower)
    assert all(re.sub(pattern, replacement, name) == name for name in names if name not in tower)
    nested = "model.vision_tower.vision_model.encoder.layers.0.mlp.fc1.weight"
    assert re.sub(pattern, replacement, nested) == nested


@needs_per_group_norm
def test_bad_input_is_one_line_exit_2_and_nothing_written(llava_export, tmp_path, cli):
    cases = {
        "no such": (tmp_path / "missing",),
        "not a model directory": (tmp_path,),
    }
    cases["a matvlm hybrid, not an export"] = (llava_export.parent / "hybrid",)  # what the export was made from
    for expected, args in cases.items():
        before = sorted(tmp_path.rglob("*"))
        run = cli("serve", *args)
        assert run.returncode == 2, run.stderr
        assert len(run.stderr.strip().splitlines()) == 1 and expected in run.stderr and "Traceback" not in run.stderr
        assert sorted(tmp_path.rglob("*")) == before


@needs_per_group_norm
def test_an_export_saved_by_transformers_before_5_23_is_refused(llava_export, tmp_path, cli):
    """5.17-5.22 compute the gated norm over the whole width: what they saved is not what vLLM serves."""
    old = tmp_path / "old"
    shutil.copytree(llava_export, old)
    config = json.loads((old / "config.json").read_text())
    assert config["text_config"]["mamba_n_groups"] > 1
    (old / "config.json").write_text(json.dumps({**config, "transformers_version": "5.19.0"}))
    run = cli("serve", old)
    assert run.returncode == 2 and len(run.stderr.strip().splitlines()) == 1
    assert "saved by transformers 5.19.0" in run.stderr and "per group" in run.stderr and ">= 5.23" in run.stderr
    one_group = tmp_path / "one-group"
    shutil.copytree(old, one_group)
    config["text_config"]["mamba_n_groups"] = 1
    (one_group / "config.json").write_text(json.dumps({**config, "transformers_version": "5.19.0"}))
    assert check_servable(one_group).architecture  # one group: the same norm in every version


@needs_per_group_norm
def test_a_family_vllm_cannot_serve_is_refused_with_the_reason(tmp_path_factory, cli):
    """A real SmolVLM export (Llama text, so `export` writes it) whose family vLLM cannot serve here."""
    import zoo

    teacher = zoo.save("smolvlm", tmp_path_factory.mktemp("smolvlm") / "teacher")
    export = _export(tmp_path_factory, teacher, [1], "smolvlm")
    reason = MODEL_FAMILIES["smolvlm"].serve
    assert not isinstance(reason, ServeMapping) and "torchvision" in reason
    with pytest.raises(MatvlmError, match=re.escape(f"vLLM cannot serve this smolvlm export as a hybrid: {reason}")):
        check_servable(export)
    run = cli("serve", export)
    assert run.returncode == 2 and len(run.stderr.strip().splitlines()) == 1 and "cannot serve" in run.stderr


@needs_per_group_norm
def test_an_idefics3_export_is_served_by_the_plugin_class_that_builds_the_hybrid_text_model(tmp_path_factory):
    """Idefics3: vLLM's class builds a fixed LlamaModel for the text, so the plugin's class swaps in
    vLLM's GraniteMoeHybridModel; the saved names are vLLM's already (no renames)."""
    import zoo

    teacher = zoo.save("idefics3", tmp_path_factory.mktemp("idefics3") / "teacher")
    export = _export(tmp_path_factory, teacher, [1], "idefics3")
    plan = check_servable(export)
    assert plan.architecture == "MatvlmIdefics3ForConditionalGeneration"
    assert engine_options(plan, cpu=True)["hf_overrides"] == {"architectures": [plan.architecture]}
    mapping = MODEL_FAMILIES["idefics3"].serve
    assert mapping.fixed_language_model == "vllm.model_executor.models.idefics3:LlamaModel" and not mapping.renames
    with safe_open(export / "model.safetensors", "pt") as weights:
        names = set(weights.keys())
    # what vLLM's Idefics3ForConditionalGeneration holds: model.vision_model, model.connector, model.text_model, lm_head
    assert {name.split(".")[1] for name in names if name.startswith("model.")} == {"vision_model", "connector", "text_model"}
    assert any(".mamba." in name for name in names if name.startswith("model.text_model.layers.1."))


@needs_per_group_norm
def test_a_class_of_a_served_family_that_the_plugin_does_not_extend_is_refused(llava_export, tmp_path):
    """The family is served (LLaVA) but the export's class is another of its classes: refused, not served
    by the wrong vLLM class."""
    other = tmp_path / "other"
    shutil.copytree(llava_export, other)
    config = json.loads((other / "config.json").read_text())
    (other / "config.json").write_text(json.dumps({**config, "architectures": ["LlavaNextVideoForConditionalGeneration"]}))
    with pytest.raises(MatvlmError, match="no class for LlavaNextVideoForConditionalGeneration"):
        check_servable(other)


@needs_per_group_norm
@pytest.mark.skipif(HAVE_VLLM, reason="vLLM is installed here: this checks the message when it is not")
def test_serving_without_vllm_says_how_to_install_it(llava_export):
    run = _serve(str(llava_export), "--port", "8123")
    assert run.returncode == 2 and len(run.stderr.strip().splitlines()) == 1
    assert "vLLM is not installed" in run.stderr and 'pip install "matvlm[serve]"' in run.stderr


@needs_vllm
def test_the_plugin_class_is_vllms_llava_marked_hybrid_with_the_export_names_mapped():
    from matvlm_cli.serve import models  # first: without torchvision, vLLM's LLaVA imports through its stand-in

    # isort: split
    from vllm.model_executor.models.interfaces import has_inner_state, is_hybrid
    from vllm.model_executor.models.llava import LlavaForConditionalGeneration

    served = models.MatvlmLlavaForConditionalGeneration
    assert issubclass(served, LlavaForConditionalGeneration) and is_hybrid(served) and has_inner_state(served)
    mapper = served.hf_to_vllm_mapper
    assert mapper.map_name("vision_tower.embeddings.patch_embedding.weight") == "vision_tower.vision_model.embeddings.patch_embedding.weight"
    assert mapper.map_name("model.language_model.layers.1.mamba.in_proj.weight") == "language_model.model.layers.1.mamba.in_proj.weight"


@needs_vllm
def test_the_idefics3_plugin_class_is_vllms_marked_hybrid():
    from vllm.model_executor.models import idefics3
    from vllm.model_executor.models.interfaces import has_inner_state, is_hybrid
    from vllm.model_executor.models.llama import LlamaModel

    from matvlm_cli.serve import models

    served = models.MatvlmIdefics3ForConditionalGeneration
    assert issubclass(served, idefics3.Idefics3ForConditionalGeneration) and is_hybrid(served) and has_inner_state(served)
    assert served.__init__ is not idefics3.Idefics3ForConditionalGeneration.__init__
    assert idefics3.LlamaModel is LlamaModel  # swapped only while an instance is built
