"""Convert a VLM with the Python API, save it, load it back and generate with `generate()`.

    python examples/convert_and_generate.py [--teacher DIR] [--output DIR]

Without --teacher it uses the embedded default teacher.
"""

import argparse
import tempfile
from pathlib import Path

import torch
from PIL import Image, ImageDraw
from transformers import AutoProcessor

from matvlm_cli import choose_layers, convert_to_hybrid, load_hybrid, load_teacher, save_hybrid
from matvlm_cli.hybrid.io import HYBRID_KEY, hybrid_block
from matvlm_cli.tiny import default_teacher_dir


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--teacher", type=Path, default=None)
    parser.add_argument("--output", type=Path, default=Path(tempfile.mkdtemp()) / "hybrid")
    args = parser.parse_args()
    teacher_dir = args.teacher or default_teacher_dir()

    # 1. Convert: a quarter of the decoder layers, spread evenly, become Mamba-2 layers.
    model = load_teacher(teacher_dir)
    num_layers = model.config.get_text_config(decoder=True).num_hidden_layers
    layers = choose_layers(num_layers, ratio=0.25, placement="even")
    mixer_config = convert_to_hybrid(model, layers)
    setattr(model.config, HYBRID_KEY, hybrid_block(layers, mixer_config, source=str(teacher_dir)))
    save_hybrid(model, args.output, source=teacher_dir, overwrite=True)
    print(f"replaced layers {layers} of {num_layers}; saved to {args.output}")

    # 2. Load it back and generate, exactly as with any transformers VLM.
    hybrid = load_hybrid(args.output)
    teacher = load_teacher(teacher_dir)
    processor = AutoProcessor.from_pretrained(args.output)
    image = Image.new("RGB", (64, 64), "white")
    ImageDraw.Draw(image).ellipse((8, 8, 40, 40), fill="red")
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Is there a red circle in the image?"}]}]
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
    inputs = processor(images=[image], text=[prompt], return_tensors="pt")
    for name, model in (("teacher", teacher), ("hybrid", hybrid)):
        with torch.no_grad():
            out = model.generate(**inputs, max_new_tokens=10, do_sample=False)
        answer = processor.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
        print(f"{name:>8}: {answer!r}")


if __name__ == "__main__":
    main()
