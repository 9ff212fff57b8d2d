"""The embedded default teacher: its tokenizer, processor, architecture and training.

A real `LlavaForConditionalGeneration` (SigLIP vision tower, Llama text model with GQA) trained
from scratch on the synthetic world, so that every subcommand has a model that answers real
questions about images without any download. Regenerate it with:

    python -m matvlm_cli.world --output world --seed 0 --train-size 150000
    python -m matvlm_cli.teacher --world world --output matvlm_cli/presets/tiny-teacher

The shipped weights were trained on the GPU machine (one H100, bf16 autocast) with these defaults:
150k training scenes, 10 epochs at batch 512 (2920 steps), 475 s including 116 s of loading the
images (world generation took 84 s on its CPU). On 2 CPU cores the same run would take many hours.
The run's settings, time and held-out scores are written to `training.json` beside the weights. Same
seed, same data and same device give the same weights up to GPU non-determinism in attention
backward. The previous defaults (6 epochs at batch 256, lr 1e-3) scored 0.80-0.88 on adversarial POPE.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from safetensors.torch import load_file, save_file
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaProcessor,
    PreTrainedTokenizerFast,
    SiglipImageProcessorPil,
    SiglipVisionConfig,
)

from .world.questions import world_corpus

IMAGE_SIZE, PATCH_SIZE = 64, 8
IMAGE_TOKENS = (IMAGE_SIZE // PATCH_SIZE) ** 2
IMAGE_TOKEN, PAD, BOS, EOS = "<image>", "<pad>", "<s>", "</s>"
# Vicuna-style turns as in LLaVA-1.5 / TinyLLaVA, without the long system sentence (it would only
# add tokens to every training sequence of this tiny model).
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'user' %}USER: "
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for part in message['content'] %}{% if part['type'] == 'image' %}<image>\n{% endif %}{% endfor %}"
    "{% for part in message['content'] %}{% if part['type'] == 'text' %}{{ part['text'] }}{% endif %}{% endfor %}"
    "{% endif %} ASSISTANT:"
    "{% else %} "
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for part in message['content'] %}{{ part['text'] }}{% endfor %}{% endif %}</s>"
    "{% endif %}{% endfor %}"
)


def user_turn(text: str) -> str:
    """What the chat template renders for one user message (`<image>\\n` first when present)."""
    return f"USER: {text} ASSISTANT:"


def train_tokenizer(vocab_size: int = 1024) -> PreTrainedTokenizerFast:
    """Byte-level BPE trained on the world's texts: exact round trips, every word one or two tokens."""
    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=[PAD, BOS, EOS, IMAGE_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    corpus = world_corpus() + [user_turn(""), " ASSISTANT:", "USER:"]
    core.train_from_iterator(corpus, trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core, pad_token=PAD, bos_token=BOS, eos_token=EOS,
        extra_special_tokens={"image_token": IMAGE_TOKEN}, padding_side="left",
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def build_processor(tokenizer: PreTrainedTokenizerFast, image_size: int = IMAGE_SIZE, patch_size: int = PATCH_SIZE) -> LlavaProcessor:
    """SigLIP-style images (square, mean = std = 0.5), every patch an image token, our chat template."""
    image_processor = SiglipImageProcessorPil(
        size={"height": image_size, "width": image_size}, image_mean=[0.5] * 3, image_std=[0.5] * 3,
    )
    return LlavaProcessor(
        image_processor=image_processor, tokenizer=tokenizer, patch_size=patch_size,
        vision_feature_select_strategy="full", num_additional_image_tokens=0, image_token=IMAGE_TOKEN,
        chat_template=CHAT_TEMPLATE,
    )


def teacher_config(tokenizer: PreTrainedTokenizerFast, vision_hidden: int = 192, vision_layers: int = 4) -> LlavaConfig:
    """8 Llama layers (hidden 256, 8 heads, 2 KV heads): ratio 0.25 and 0.5 are whole layers."""
    text = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=256, intermediate_size=384, num_hidden_layers=8,
        num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=1024,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=True,
    )
    vision = SiglipVisionConfig(
        hidden_size=vision_hidden, intermediate_size=2 * vision_hidden, num_hidden_layers=vision_layers,
        num_attention_heads=4,
        image_size=IMAGE_SIZE, patch_size=PATCH_SIZE,
    )
    return LlavaConfig(
        vision_config=vision.to_dict(), text_config=text.to_dict(),
        image_token_id=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN), vision_feature_layer=-1,
        vision_feature_select_strategy="full", projector_hidden_act="gelu", tie_word_embeddings=True,
    )


def _conversation_pieces(turns: list[dict]) -> list[tuple[str, bool]]:
    """(text, learned) pieces of a LLaVA-format conversation; only assistant turns are learned."""
    pieces = []
    for turn in turns:
        if turn["from"] == "human":
            pieces.append((user_turn(turn["value"].replace(IMAGE_TOKEN, IMAGE_TOKEN * IMAGE_TOKENS)), False))
        else:
            pieces.append((" " + turn["value"] + EOS, True))
    return pieces


def encode_conversations(tokenizer, conversations: list[list[dict]]) -> list[tuple[list[int], list[int]]]:
    """Token ids and labels (-100 outside assistant turns) for many conversations, batch-tokenised."""
    pieces = [_conversation_pieces(turns) for turns in conversations]
    flat = [text for conv in pieces for text, _ in conv]
    tokens = iter(tokenizer(flat, add_special_tokens=False)["input_ids"])
    encoded = []
    for conv in pieces:
        ids, labels = [], []
        for _, learned in conv:
            piece = next(tokens)
            ids += piece
            labels += piece if learned else [-100] * len(piece)
        encoded.append((ids, labels))
    return encoded


def load_training_set(world: Path, tokenizer, processor):
    """Pixels and token ids of the training conversations.

    The world's images are already IMAGE_SIZE square, so the processor's work reduces to
    x / 127.5 - 1 (rescale, then normalise with mean = std = 0.5); doing that in numpy is 30x faster.
    """
    records = json.loads((world / "train" / "conversations.json").read_text())
    pixels = torch.empty(len(records), 3, IMAGE_SIZE, IMAGE_SIZE, dtype=torch.float16)
    for i, record in enumerate(records):
        image = np.array(Image.open(world / "train" / record["image"]).convert("RGB"))
        assert image.shape == (IMAGE_SIZE, IMAGE_SIZE, 3), f"{record['image']}: expected {IMAGE_SIZE}px images"
        pixels[i] = torch.from_numpy(image).permute(2, 0, 1).float() / 127.5 - 1
    return pixels, encode_conversations(tokenizer, [r["conversations"] for r in records])


def pad_all(encoded: list[tuple[list[int], list[int]]], pad_id: int):
    """Every conversation in one right-padded tensor, so a batch is one index, not a Python loop."""
    width = max(len(ids) for ids, _ in encoded)
    ids = torch.full((len(encoded), width), pad_id)
    labels = torch.full((len(encoded), width), -100)
    lengths = torch.tensor([len(seq) for seq, _ in encoded])
    for row, (seq, lab) in enumerate(encoded):
        ids[row, : len(seq)], labels[row, : len(lab)] = torch.tensor(seq), torch.tensor(lab)
    return ids, labels, lengths


def train_teacher(
    world: Path, output: Path, seed: int = 0, epochs: int = 10, batch_size: int = 512, lr: float = 1.5e-3,
    vision_hidden: int = 192, vision_layers: int = 4,
) -> dict:
    started = time.time()
    random.seed(seed)
    torch.manual_seed(seed)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    tokenizer = train_tokenizer()
    processor = build_processor(tokenizer)
    model = LlavaForConditionalGeneration(teacher_config(tokenizer, vision_hidden, vision_layers)).to(device)
    pixels, encoded = load_training_set(world, tokenizer, processor)
    all_ids, all_labels, lengths = pad_all(encoded, tokenizer.pad_token_id)
    pixels, all_ids, all_labels, lengths = (t.to(device) for t in (pixels, all_ids, all_labels, lengths))
    print(f"{len(encoded)} conversations loaded ({time.time() - started:.0f}s)", flush=True)
    order_rng = torch.Generator().manual_seed(seed)
    steps_per_epoch = len(encoded) // batch_size
    total = steps_per_epoch * epochs
    warmup = max(1, min(500, total // 10))
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.01)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min(1.0, (s + 1) / warmup) * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * min(s, total) / total)))
    )
    model.train()
    step = 0
    for epoch in range(epochs):
        order = torch.randperm(len(encoded), generator=order_rng).to(device)
        for start in range(0, steps_per_epoch * batch_size, batch_size):
            rows = order[start : start + batch_size]
            width = int(lengths[rows].max())
            ids, labels = all_ids[rows, :width], all_labels[rows, :width]
            mask = (torch.arange(width, device=device)[None] < lengths[rows, None]).long()
            with torch.autocast(device, dtype=torch.bfloat16, enabled=device == "cuda"):
                loss = model(input_ids=ids, attention_mask=mask, pixel_values=pixels[rows].float(), labels=labels).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            schedule.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            if step % 500 == 0 or step == total:
                print(f"epoch {epoch + 1}/{epochs} step {step}/{total} loss {loss.item():.4f} ({time.time() - started:.0f}s)", flush=True)
    model.eval()
    if not math.isfinite(loss.item()):
        raise RuntimeError(f"training diverged (loss {loss.item()}); lower --lr")
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.bos_token_id = tokenizer.bos_token_id
    # Shipped as bf16 tensors (half the package size) under a float32 config, so CPUs compute in
    # float32; the held-out scores below are those of these rounded weights.
    model = model.to("cpu", torch.bfloat16).to(torch.float32)
    output.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(output)
    weights = output / "model.safetensors"
    save_file({name: t.to(torch.bfloat16).contiguous() for name, t in load_file(weights).items()}, weights, metadata={"format": "pt"})
    processor.save_pretrained(output)
    info = {
        "seed": seed, "epochs": epochs, "batch_size": batch_size, "lr": lr, "steps": total,
        "vision_hidden": vision_hidden, "vision_layers": vision_layers,
        "train_conversations": len(encoded), "final_loss": loss.item(), "seconds": round(time.time() - started, 1),
        "device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
        "parameters": sum(p.numel() for p in model.parameters()),
    }
    from .evaluate.quality import benchmark_scores

    info["held_out"] = benchmark_scores(model.to(device), output, world)
    (output / "training.json").write_text(json.dumps(info, indent=2))
    return info


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Train the embedded default teacher on a generated world.")
    parser.add_argument("--world", type=Path, required=True)
    parser.add_argument("--output", type=Path, required=True)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=512)
    parser.add_argument("--lr", type=float, default=1.5e-3)
    parser.add_argument("--vision-hidden", type=int, default=192)
    parser.add_argument("--vision-layers", type=int, default=4)
    args = parser.parse_args(argv)
    info = train_teacher(
        args.world, args.output, args.seed, args.epochs, args.batch_size, args.lr, args.vision_hidden, args.vision_layers
    )
    print(json.dumps(info, indent=2))


if __name__ == "__main__":
    main()
