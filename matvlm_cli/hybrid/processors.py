"""A model directory's processor as matvlm reads it: images only where torchvision is missing, on
transformers' PIL backend everywhere, its chat template rendered alike for every processor."""

from __future__ import annotations

import functools
import inspect
import json
import os
from pathlib import Path

from ..errors import MatvlmError
from .layouts import FILE_ERRORS, first_line, layout_reader

# Everything a processor or tokenizer may need, copied next to the hybrid's weights.
PROCESSOR_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
    "vocab.json", "vocab.txt", "merges.txt", "tokenizer.model", "spiece.model",
    "processor_config.json", "preprocessor_config.json", "chat_template.json", "chat_template.jinja",
    "generation_config.json",
)


def _torchvision_missing() -> bool:
    try:
        import torchvision  # noqa: F401
    except ImportError:
        return True
    return False


@functools.cache
def images_only(processor_class: type) -> type:
    """`processor_class` as matvlm builds it. Without torchvision, whose only user in these processors is
    the video processor, processors that also take videos (Qwen-VL, InternVL, LLaVA-OneVision, SmolVLM)
    cannot even be built. matvlm gives them images only: a subclass of the same name (saved folders name the
    stock class) that declares no video processor among its parts. Build it with `video_processor=None`;
    a video passed to one fails. With torchvision installed, or for a class without a video processor,
    this is the class itself."""
    takes_video = "video_processor" in inspect.signature(processor_class.__init__).parameters
    if not takes_video or not _torchvision_missing():
        return processor_class
    parts = processor_class.get_attributes.__func__

    def get_attributes(cls):
        return [part for part in parts(cls) if part != "video_processor"]

    return type(processor_class.__name__, (processor_class,), {
        "get_attributes": classmethod(get_attributes), "__module__": processor_class.__module__,
        "__qualname__": processor_class.__qualname__, "built_without_video": True})


def _saved_processor_class(path: Path) -> type | None:
    """The stock processor class a folder's processor_config.json names, if transformers has it."""
    import transformers

    config = path / "processor_config.json"
    try:
        name = json.loads(config.read_text()).get("processor_class") if config.is_file() else None
    except (OSError, ValueError):
        return None
    return getattr(transformers, name, None) if isinstance(name, str) else None


def render_chat(processor, messages: list[dict], add_generation_prompt: bool = False) -> str:
    """The processor's chat template rendered as text. A processor built without its video processor (see
    `images_only`) renders through ProcessorMixin's own method: SmolVLM's override
    reads the video processor's frame settings even for a chat of images, and adds nothing else for one."""
    from transformers import ProcessorMixin

    built_without_video = getattr(type(processor), "built_without_video", False)
    render = ProcessorMixin.apply_chat_template.__get__(processor) if built_without_video else processor.apply_chat_template
    return render(messages, add_generation_prompt=add_generation_prompt)


def on_pil(processor):
    """The processor with its image processor on transformers' PIL backend. A saved image processor does
    not record its backend, and transformers loads the torchvision one wherever torchvision is installed,
    whose resize gives other pixels (the GPU machine's TinyLLaVA round trip differed by 1e-3 in the
    logits): matvlm reads every directory on PIL, so a model preprocesses alike on every machine."""
    import transformers

    image_processor = getattr(processor, "image_processor", None)
    backends = [base.__name__ for base in type(image_processor).__mro__]
    if image_processor is None or "TorchvisionBackend" not in backends:
        return processor
    pil_class = getattr(transformers, type(image_processor).__name__.removesuffix("Fast") + "Pil", None)
    if pil_class is not None:
        processor.image_processor = pil_class.from_dict(image_processor.to_dict())
    return processor


def load_processor(path: str | os.PathLike, trust_remote_code: bool = False):
    """The directory's processor (tokenizer, image processor on PIL, chat template)."""
    from transformers import AutoProcessor

    if reader := layout_reader(path):
        return reader.processor(Path(path))
    try:
        stock = _saved_processor_class(Path(path))
        if stock is not None and images_only(stock) is not stock:
            return on_pil(images_only(stock).from_pretrained(path, video_processor=None))
        return on_pil(AutoProcessor.from_pretrained(path, trust_remote_code=trust_remote_code))
    except FILE_ERRORS as err:
        raise MatvlmError(f"{path}: no usable processor (preprocessor_config.json, tokenizer files): {first_line(err)}") from None
