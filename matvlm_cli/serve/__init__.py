"""vLLM serving of `matvlm export`'s folders: the plugin vLLM loads through its `vllm.general_plugins`
entry point (`register`), the vLLM classes it registers (`models`), the checks and flags `matvlm serve`
runs with (`servable`, `run`; no vLLM needed) and `make serve-check` (`check`). Nothing outside this
package imports vLLM. See docs/serving.md."""

from __future__ import annotations


def register() -> None:
    """vLLM's plugin hook, run in every vLLM process: name each served family's hybrid class, lazily
    ("module:Class"), so that nothing is imported until a model asks for it."""
    from vllm import ModelRegistry

    from ..families import MODEL_FAMILIES, ServeMapping
    from .compat import pixtral_without_torchvision

    pixtral_without_torchvision()

    served = {family.serve.architecture for family in MODEL_FAMILIES.values() if isinstance(family.serve, ServeMapping)}
    for architecture in sorted(served):
        ModelRegistry.register_model(architecture, f"{__name__}.models:{architecture}")
