"""The vLLM classes that serve matvlm's VLM exports as hybrids.

vLLM builds a VLM's language model from `text_config.architectures` (GraniteMoeHybridForCausalLM
here, with its Mamba-2 layers), but decides whether to allocate Mamba state from the top class, which
its VLM classes do not mark as hybrid. Each class here is vLLM's own class for the family (a family's
`ServeMapping`) that also answers vLLM's hybrid questions (state shapes, dtypes, copy functions) from
the GraniteMoeHybrid text config, exactly as vLLM's GraniteMoeHybridForCausalLM answers them from its
own config, and reads the weights under the names transformers 5 saves.

Classes are built on first access (`module:Class` is how the plugin registers them), one per family.
"""

from __future__ import annotations

import importlib
import re

from .compat import pixtral_without_torchvision

pixtral_without_torchvision()  # before any vLLM model module is imported

from vllm.model_executor.layers.mamba.mamba_utils import (  # noqa: E402
    MambaStateCopyFuncCalculator,
    MambaStateDtypeCalculator,
    MambaStateShapeCalculator,
)
from vllm.model_executor.models.interfaces import HasInnerState, IsHybrid  # noqa: E402
from vllm.model_executor.models.utils import WeightsMapper  # noqa: E402

from ..families import MODEL_FAMILIES, ServeMapping  # noqa: E402


class HybridTextModel(HasInnerState, IsHybrid):
    """vLLM's hybrid interface for a model whose text config is GraniteMoeHybrid."""

    is_hybrid = True
    has_inner_state = True

    @classmethod
    def get_mamba_state_dtype_from_config(cls, vllm_config):
        cache = vllm_config.cache_config
        return MambaStateDtypeCalculator.mamba2_state_dtype(
            vllm_config.model_config.dtype, cache.mamba_cache_dtype, cache.mamba_ssm_cache_dtype,
        )

    @classmethod
    def get_mamba_state_shape_from_config(cls, vllm_config):
        text = vllm_config.model_config.hf_config.get_text_config()
        return MambaStateShapeCalculator.mamba2_state_shape(
            intermediate_size=text.mamba_expand * text.hidden_size,
            tp_world_size=vllm_config.parallel_config.tensor_parallel_size,
            n_groups=text.mamba_n_groups, num_heads=text.mamba_n_heads, head_dim=text.mamba_d_head,
            state_size=text.mamba_d_state, conv_kernel=text.mamba_d_conv,
            num_spec=vllm_config.num_speculative_tokens,
        )

    @classmethod
    def get_mamba_state_copy_func(cls):
        return MambaStateCopyFuncCalculator.mamba2_state_copy_func()


def _building_granite_text_model(base: type, fixed: str):
    """An __init__ for a subclass of `base`, whose own __init__ builds its language model from the fixed
    class `fixed` ("module:Name"): while it runs, that name in that module is vLLM's GraniteMoeHybridModel,
    which takes the same arguments (vllm_config of the text config, prefix) and loads the export's names."""
    module_name, name = fixed.split(":")

    def __init__(self, *, vllm_config, prefix: str = ""):
        from vllm.model_executor.models.granitemoehybrid import GraniteMoeHybridModel

        module = importlib.import_module(module_name)
        original = getattr(module, name)
        setattr(module, name, GraniteMoeHybridModel)
        try:
            base.__init__(self, vllm_config=vllm_config, prefix=prefix)
        finally:
            setattr(module, name, original)

    return __init__


def _hybrid_class(mapping: ServeMapping) -> type:
    module, name = mapping.vllm_class.split(":")
    base = getattr(importlib.import_module(module), name)
    renames = WeightsMapper(orig_to_new_regex={re.compile(pattern): new for pattern, new in mapping.renames})
    # vLLM's class first: its __init__ and forward; the hybrid answers come from the mixin
    namespace = {
        "__module__": __name__,
        "__doc__": f"vLLM's {name} with the Mamba state of its GraniteMoeHybrid text model (matvlm export).",
        # ours run first: the regular expressions apply before vLLM's own prefix renaming
        "hf_to_vllm_mapper": renames | inherited if (inherited := getattr(base, "hf_to_vllm_mapper", None)) else renames,
    }
    if mapping.fixed_language_model:
        namespace["__init__"] = _building_granite_text_model(base, mapping.fixed_language_model)
    return type(mapping.architecture, (base, HybridTextModel), namespace)


_MAPPINGS = {
    family.serve.architecture: family.serve
    for family in MODEL_FAMILIES.values() if isinstance(family.serve, ServeMapping)
}
_BUILT: dict[str, type] = {}


def __getattr__(name: str) -> type:
    if name not in _MAPPINGS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    if name not in _BUILT:
        _BUILT[name] = _hybrid_class(_MAPPINGS[name])
    return _BUILT[name]
