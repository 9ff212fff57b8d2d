"""Hybrid generation through the standard `generate()`, and save/load."""

import pytest
import torch
from conftest import FAMILIES
from PIL import Image
from transformers import AutoProcessor

from matvlm_cli.hybrid import choose_layers, convert_to_hybrid, load_hybrid, load_teacher, save_hybrid

QUESTIONS = ["is there a red circle in the image ?", "what number is shown ?"]


def hybrid_of(teacher_dir, ratio=0.5):
    model = load_teacher(teacher_dir)
    layers = choose_layers(model.config.text_config.num_hidden_layers, ratio)
    convert_to_hybrid(model, layers, source=str(teacher_dir))
    return model.eval()


IMAGES = [Image.new("RGB", (40, 40), (200, 30, 30)), Image.new("RGB", (48, 30), (20, 90, 220))]


def inputs_for(teacher_dir, questions, images=IMAGES):
    processor = AutoProcessor.from_pretrained(teacher_dir)
    prompts = [
        processor.apply_chat_template(
            [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": q}]}], add_generation_prompt=True
        )
        for q in questions
    ]
    return processor(images=images[: len(questions)], text=prompts, return_tensors="pt", padding=True)


def greedy(model, inputs, **kwargs):
    return model.generate(
        **inputs, max_new_tokens=12, do_sample=False, output_scores=True, return_dict_in_generate=True,
        min_new_tokens=12, suppress_tokens=[model.config.image_token_id], **kwargs,
    )  # a random model may emit the image token, which recomputation would then expand


@pytest.mark.parametrize("family", FAMILIES)
def test_cached_greedy_matches_full_recomputation(tiny_teachers, family):
    model = hybrid_of(tiny_teachers[family])
    inputs = inputs_for(tiny_teachers[family], QUESTIONS)
    assert inputs["attention_mask"].min() == 0  # the batch really is left-padded
    cached, full = greedy(model, inputs), greedy(model, inputs, use_cache=False)
    assert torch.equal(cached.sequences, full.sequences)
    for a, b in zip(cached.scores, full.scores):
        assert torch.allclose(a, b, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("family", ["llama", "phi"])
def test_left_padded_batch_matches_each_sequence_alone(tiny_teachers, family):
    model = hybrid_of(tiny_teachers[family])
    batch = greedy(model, inputs_for(tiny_teachers[family], QUESTIONS))
    for row, question in enumerate(QUESTIONS):
        alone = greedy(model, inputs_for(tiny_teachers[family], [question], [IMAGES[row]]))
        new_batch = batch.sequences[row, -12:]
        assert torch.equal(new_batch, alone.sequences[0, -12:])
        assert torch.allclose(batch.scores[0][row], alone.scores[0][0], atol=1e-4)


def test_beam_search_and_sampling(tiny_teachers):
    model = hybrid_of(tiny_teachers["qwen2"])
    inputs = inputs_for(tiny_teachers["qwen2"], QUESTIONS)
    beams = model.generate(**inputs, max_new_tokens=6, num_beams=3, do_sample=False)
    beams_full = model.generate(**inputs, max_new_tokens=6, num_beams=3, do_sample=False, use_cache=False)
    assert torch.equal(beams, beams_full)
    torch.manual_seed(0)
    sampled = model.generate(**inputs, max_new_tokens=6, do_sample=True, temperature=0.8, top_k=20)
    assert sampled.shape[0] == 2 and sampled.shape[1] >= inputs["input_ids"].shape[1] + 1


@pytest.mark.parametrize("family", FAMILIES)
def test_save_then_load_gives_identical_logits(tiny_teachers, family, tmp_path):
    model = hybrid_of(tiny_teachers[family], ratio=0.25)
    inputs = inputs_for(tiny_teachers[family], QUESTIONS)
    save_hybrid(model, tmp_path / "hybrid", source=tiny_teachers[family])
    loaded = load_hybrid(tmp_path / "hybrid")
    with torch.no_grad():
        assert torch.equal(model(**inputs).logits, loaded(**inputs).logits)
    assert (tmp_path / "hybrid" / "tokenizer.json").is_file()
    assert AutoProcessor.from_pretrained(tmp_path / "hybrid") is not None
    assert torch.equal(greedy(model, inputs).sequences, greedy(loaded, inputs).sequences)


def test_run_generate_raises_what_generation_raises_rather_than_hanging(tiny_teachers, monkeypatch):
    """generate runs `model.generate` in a thread that feeds the stream; a failure there (a forward that
    fails mid-answer) must reach the caller, not leave it waiting on a stream nobody ends."""
    import functools
    import threading

    from transformers import LlavaForConditionalGeneration

    from matvlm_cli.generate import run_generate

    @functools.wraps(LlavaForConditionalGeneration.forward)  # generate reads the forward's signature
    def failing_forward(self, *args, **kwargs):
        raise RuntimeError("the forward failed")

    monkeypatch.setattr(LlavaForConditionalGeneration, "forward", failing_forward)
    outcome = []

    def call():
        try:
            run_generate(tiny_teachers["llama"], None, "what number is shown ?", max_new_tokens=4)
        except BaseException as err:
            outcome.append(err)

    caller = threading.Thread(target=call, daemon=True)
    caller.start()
    caller.join(timeout=60)
    assert not caller.is_alive(), "run_generate hung after model.generate raised in its thread"
    assert len(outcome) == 1 and isinstance(outcome[0], RuntimeError) and str(outcome[0]) == "the forward failed"
