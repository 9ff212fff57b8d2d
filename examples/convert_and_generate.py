"""Convert a VLM with the Python API, save it, load it back and generate with `generate()`.

    python examples/convert_and_generate.py [--teacher DIR] [--output DIR]

Without --teacher it uses the embedded default teacher and also scores teacher and hybrid on the
held-out synthetic benchmarks: before distillation the hybrid is far below its teacher.
"""

import argparse
import tempfile
from pathlib import Path

import torch
from transformers import AutoProcessor

from matvlm_cli import choose_layers, convert_to_hybrid, load_hybrid, load_teacher, save_hybrid
from matvlm_cli.evaluate.quality import benchmark_scores
from matvlm_cli.paths import default_teacher_dir
from matvlm_cli.world import generate_world
from matvlm_cli.world.scenes import Scene, SceneObject, render


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
    convert_to_hybrid(model, layers, source=str(teacher_dir))  # also records the conversion in model.config
    save_hybrid(model, args.output, source=teacher_dir, overwrite=True)
    print(f"replaced layers {layers} of {num_layers}; saved to {args.output}")

    # 2. Load it back and generate, exactly as with any transformers VLM.
    hybrid = load_hybrid(args.output)
    teacher = load_teacher(teacher_dir)
    processor = AutoProcessor.from_pretrained(args.output)
    image = render(Scene(objects=(SceneObject("red", "circle", "large", 0, (0, 0)),), background="white", text="moon"))
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Describe the image briefly."}]}]
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
    inputs = processor(images=[image], text=[prompt], return_tensors="pt")
    print("Describe the image briefly.")
    for name, model in (("teacher", teacher), ("hybrid", hybrid)):
        with torch.no_grad():
            out = model.generate(**inputs, max_new_tokens=48, do_sample=False)
        answer = processor.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
        print(f"{name:>8}: {answer.strip()}")

    if args.teacher is None:
        world = generate_world(Path(tempfile.mkdtemp()) / "world", seed=0, train_size=1).root
        print("\nheld-out accuracy (synthetic POPE / MMMU / TextVQA):")
        for name, model in (("teacher", teacher), ("hybrid", hybrid)):
            scores = benchmark_scores(model, args.output, world)
            print(f"{name:>8}: " + "  ".join(f"{k.replace('_accuracy', '')} {v:.2f}" for k, v in scores.items()))


if __name__ == "__main__":
    main()
