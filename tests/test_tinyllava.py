"""TinyLLaVA checkpoints and MaTVLM's released hybrids, as published, read as matvlm teachers and hybrids.

The checkpoints are tiny and random but in the published layouts (key names, config fields, Phi-2's
vocab.json + merges.txt, fp32 shards with an index). Every logit is checked against a reference forward
written here from the published facts (docs/paper.md), not against the loader. The subcommands run on them
through the entry point in this process (the `cli` fixture), the conversion the module shares in a process
of its own.
"""

import json
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import load_file, save_file
from tokenizers import ByteLevelBPETokenizer
from torch import nn
from transformers import AutoProcessor, PhiConfig, PhiForCausalLM, SiglipVisionConfig, SiglipVisionModel

from matvlm_cli.errors import MatvlmError
from matvlm_cli.hybrid import hybrid_layers, load_hybrid, load_model, load_teacher
from matvlm_cli.hybrid.checks import check_model
from matvlm_cli.hybrid.processors import load_processor

IMAGE_SIZE, PATCH = 28, 7  # 16 patches; TinyLLaVA's "patch" keeps the last 15
SYSTEM = ("A chat between a curious user and an artificial intelligence assistant. The assistant gives helpful, "
          "detailed, and polite answers to the user's questions.")
CORPUS = [
    "What is in the picture? A red circle on the left. Is there a blue square? Yes, there is one. "
    "USER: ASSISTANT: How many stars are shown? Two small yellow stars at the top right.",
]
MAMBA_LAYERS = [1, 3]  # attn_layers [0, 2]
NUM_LAYERS, HIDDEN, HEADS, KV_HEADS = 4, 32, 4, 2
HEAD_DIM = HIDDEN // HEADS


pytestmark = pytest.mark.usefixtures("one_thread")


def write_tokenizer(folder):
    """A byte-level BPE saved as CodeGen's slow files: vocab.json and merges.txt (plus Phi-2's config)."""
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(CORPUS * 4, vocab_size=400, min_frequency=1, special_tokens=["<|endoftext|>"])
    bpe.save_model(str(folder))
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "CodeGenTokenizer", "add_prefix_space": False, "model_max_length": 2048,
        "bos_token": "<|endoftext|>", "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>",
    }))
    return bpe.get_vocab_size()


def text_and_vision_configs(vocab_size):
    text = PhiConfig(vocab_size=vocab_size, hidden_size=HIDDEN, intermediate_size=64, num_hidden_layers=NUM_LAYERS,
                     num_attention_heads=HEADS, num_key_value_heads=HEADS, partial_rotary_factor=0.5,
                     max_position_embeddings=1024, tie_word_embeddings=False, bos_token_id=0, eos_token_id=0)
    vision = SiglipVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=3, num_attention_heads=2,
                                image_size=IMAGE_SIZE, patch_size=PATCH)
    return text, vision


def published_sub_configs(text, vision):
    """The text and vision configs as TinyLLaVA's config.json holds them (written by transformers 4.39):
    Phi's legacy rope fields and hub names, SigLIP's few fields and TinyLLaVA's own extras."""
    text_fields = {k: v for k, v in text.to_dict().items() if k not in ("rope_parameters", "transformers_version", "dtype")}
    text_fields |= {"_name_or_path": "microsoft/phi-2", "architectures": ["PhiForCausalLM"], "torch_dtype": "float32",
                    "auto_map": {"AutoConfig": "microsoft/phi-2--configuration_phi.PhiConfig"},
                    "rope_theta": 10000.0, "rope_scaling": None, "partial_rotary_factor": 0.5, "qk_layernorm": False}
    vision_fields = {k: getattr(vision, k) for k in ("hidden_act", "hidden_size", "image_size", "intermediate_size",
                                                     "layer_norm_eps", "num_attention_heads", "num_hidden_layers", "patch_size")}
    vision_fields |= {"model_type": "siglip_vision_model", "model_name_or_path": "google/siglip-so400m-patch14-384",
                      "model_name_or_path2": ""}
    return text_fields, vision_fields


def published_vision_keys(model):
    """SiglipVisionModel's weights under the names TinyLLaVA saves them with (`vision_model.` level)."""
    return {(k if k.startswith("vision_model.") else f"vision_model.{k}"): v for k, v in model.state_dict().items()}


def mamba_weights(generator, d_xb):
    """One MaTVLM Mamba-2 mixer: in_proj [z | x d_xb | B d_xb | C | dt], conv over [x, B, C]."""
    d_inner = HIDDEN
    rand = lambda *shape, scale=0.2: torch.randn(*shape, generator=generator) * scale  # noqa: E731
    return {
        "in_proj.weight": rand(2 * d_inner + 2 * d_xb + HEADS, HIDDEN),
        "conv1d.weight": rand(d_inner + 2 * d_xb, 1, 4, scale=0.5), "conv1d.bias": rand(d_inner + 2 * d_xb),
        "dt_bias": rand(HEADS, scale=1.0), "A_log": torch.rand(HEADS, generator=generator) * 2,
        "D": 1 + rand(HEADS), "norm.weight": 1 + rand(d_inner), "out_proj.weight": rand(HIDDEN, d_inner),
    }


def build_tinyllava(folder, seed=0, mamba=False, d_xb=HIDDEN // 2):
    """A TinyLLaVA folder as published (or, with `mamba`, a MaTVLM release): two shards and an index."""
    folder.mkdir(parents=True)
    torch.manual_seed(seed)
    vocab = write_tokenizer(folder) + 24  # Phi-2's embedding is larger than its tokenizer, too
    text, vision = text_and_vision_configs(vocab)
    phi, siglip = PhiForCausalLM(text), SiglipVisionModel(vision)
    with torch.no_grad():
        phi.lm_head.bias.normal_(0, 0.5)
    connector = nn.Sequential(nn.Linear(16, HIDDEN), nn.GELU(), nn.Linear(HIDDEN, HIDDEN))
    state = {f"language_model.{k}": v for k, v in phi.state_dict().items()}
    if mamba:
        generator = torch.Generator().manual_seed(seed + 7)
        for i in MAMBA_LAYERS:
            prefix = f"language_model.model.layers.{i}."
            state = {k: v for k, v in state.items() if not k.startswith(prefix + "self_attn.")}
            state |= {f"{prefix}mamba.{k}": v for k, v in mamba_weights(generator, d_xb).items()}
    shard_1 = {k: v.contiguous() for k, v in state.items()}
    shard_2 = {f"vision_tower._vision_tower.{k}": v.contiguous() for k, v in published_vision_keys(siglip).items()}
    shard_2 |= {f"connector._connector.{k}": v.contiguous() for k, v in connector.state_dict().items()}
    names = ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]
    for name, shard in zip(names, (shard_1, shard_2)):
        save_file(shard, folder / name, metadata={"format": "pt"})
    weight_map = {k: names[0] for k in shard_1} | {k: names[1] for k in shard_2}
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    (folder / "config.json").write_text(json.dumps({
        "architectures": ["TinyLlavaForConditionalGeneration"], "model_type": "tinyllava",
        "auto_map": {"AutoConfig": "configuration.TinyLlavaConfig",
                     "AutoModelForCausalLM": "modeling_tinyllava_phi.TinyLlavaForConditionalGeneration"},
        "connector_type": "mlp2x_gelu", "image_token_index": -200, "image_aspect_ratio": "square",
        "vision_feature_layer": -2, "vision_feature_select_strategy": "patch", "ignore_index": -100,
        "llm_model_name_or_path": "microsoft/phi-2", "vision_model_name_or_path": "google/siglip-so400m-patch14-384",
        "pad_token": "<|endoftext|>", "tokenizer_padding_side": "right", "tokenizer_model_max_length": 3072,
        "tokenizer_use_fast": False, "hidden_size": HIDDEN, "vocab_size": vocab, "torch_dtype": "float32",
        "tune_type_connector": "full", "tune_type_llm": "full", "tune_type_vision_tower": "frozen",
        "vision_hidden_size": 16, "transformers_version": "4.39.3", "use_cache": True, "cache_dir": None,
        **dict(zip(("text_config", "vision_config"), published_sub_configs(text, vision))),
    }))
    if mamba:
        (folder / "mamba_config.json").write_text(json.dumps({
            "d_model": HIDDEN, "ssm_cfg": {"expand": 1, "ngroups": HEADS, "d_state": HEAD_DIM}, "d_inner": HIDDEN,
            "d_xb": d_xb, "attn_layers": [i for i in range(NUM_LAYERS) if i not in MAMBA_LAYERS],
            "n_layer": NUM_LAYERS, "intermediate_size": 64, "hidden_act": "gelu_new", "is_bias": False,
        }))
    return folder


@pytest.fixture(scope="module")
def tinyllava(tmp_path_factory):
    return build_tinyllava(tmp_path_factory.mktemp("published") / "TinyLLaVA-tiny")


@pytest.fixture(scope="module")
def matvlm_release(tmp_path_factory):
    return build_tinyllava(tmp_path_factory.mktemp("published") / "MaTVLM-tiny", seed=3, mamba=True)


@pytest.fixture(scope="module")
def image():
    return Image.frombytes("RGB", (40, 22), bytes((i * 37 + 11) % 256 for i in range(40 * 22 * 3)))  # not square


# ----------------------------------------------------------------------------- the reference forward

class MaTVLMMixer(nn.Module):
    """MaTVLM's Mamba-2 (docs/paper.md), step by step: x and B at d_xb, repeated per query
    head after the depthwise causal conv; the plain recurrence; gated RMSNorm per head_dim group."""

    def __init__(self, w, d_xb):
        super().__init__()
        self.w, self.d_xb = w, d_xb

    def forward(self, hidden_states, **kwargs):
        w, d_xb, d_inner = self.w, self.d_xb, HIDDEN
        batch, length, _ = hidden_states.shape
        z, x, B, C, dt = (hidden_states @ w["in_proj.weight"].T).split([d_inner, d_xb, d_xb, d_inner, HEADS], -1)
        xBC = torch.cat([x, B, C], -1).transpose(1, 2)
        xBC = F.conv1d(xBC, w["conv1d.weight"], w["conv1d.bias"], padding=3, groups=xBC.shape[1])[..., :length]
        x, B, C = F.silu(xBC.transpose(1, 2)).split([d_xb, d_xb, d_inner], -1)
        repeat = d_inner // d_xb
        x = x.unflatten(-1, (-1, HEAD_DIM)).repeat_interleave(repeat, dim=2)
        B = B.unflatten(-1, (-1, HEAD_DIM)).repeat_interleave(repeat, dim=2)
        C = C.unflatten(-1, (HEADS, HEAD_DIM))
        dt = F.softplus(dt + w["dt_bias"])
        A = -torch.exp(w["A_log"])
        state = torch.zeros(batch, HEADS, HEAD_DIM, HEAD_DIM)
        ys = []
        for t in range(length):
            decay = torch.exp(dt[:, t] * A)[..., None, None]
            state = decay * state + dt[:, t, :, None, None] * x[:, t, :, :, None] * B[:, t, :, None, :]
            ys.append((state @ C[:, t, :, :, None]).squeeze(-1) + w["D"][:, None] * x[:, t])
        y = torch.stack(ys, 1).flatten(2) * F.silu(z)
        y = y.unflatten(-1, (HEADS, HEAD_DIM))
        y = (y * torch.rsqrt(y.pow(2).mean(-1, keepdim=True) + 1e-5)).flatten(2) * w["norm.weight"]
        return y @ w["out_proj.weight"].T, None


def reference_pixels(image):
    """The "square" preprocessing: plain bicubic resize, 1/255, mean = std = 0.5."""
    resized = image.convert("RGB").resize((IMAGE_SIZE, IMAGE_SIZE), Image.BICUBIC)
    pixels = torch.tensor(list(resized.getdata()), dtype=torch.float32).view(IMAGE_SIZE, IMAGE_SIZE, 3) / 255
    return ((pixels - 0.5) / 0.5).permute(2, 0, 1)[None]


def reference_ids(folder, question):
    """The 'phi' prompt, split at <image>, each piece tokenised alone without BOS, -200 between."""
    prompt = f"{SYSTEM} USER: <image>\n{question} ASSISTANT:"
    tokenizer = ByteLevelBPETokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"))  # GPT-2's BPE, as CodeGen's
    before, after = prompt.split("<image>")
    return tokenizer.encode(before).ids + [-200] + tokenizer.encode(after).ids, prompt


@torch.no_grad()
def reference_logits(folder, ids, pixels, d_xb=None):
    weights = {}
    for shard in sorted(folder.glob("*.safetensors")):
        weights |= load_file(shard)
    config = json.loads((folder / "config.json").read_text())
    text_fields = {k: v for k, v in config["text_config"].items() if k != "model_type"}
    vision_fields = {k: v for k, v in config["vision_config"].items() if k != "model_type"}
    siglip = SiglipVisionModel(SiglipVisionConfig(**vision_fields)).eval()
    own = set(siglip.state_dict())
    vision = {k[len("vision_tower._vision_tower."):]: v for k, v in weights.items() if k.startswith("vision_tower.")}
    siglip.load_state_dict({(k if k in own else k[len("vision_model."):]): v for k, v in vision.items()})
    features = siglip(pixels, output_hidden_states=True).hidden_states[-2][:, 1:]
    c = lambda i, p: weights[f"connector._connector.{i}.{p}"]  # noqa: E731
    image_embeds = F.linear(F.gelu(F.linear(features, c(0, "weight"), c(0, "bias"))), c(2, "weight"), c(2, "bias"))

    phi = PhiForCausalLM(PhiConfig(**text_fields)).eval()
    mamba = {}
    for key, value in weights.items():
        if ".mamba." in key:
            layer, name = key.split(".layers.")[1].split(".mamba.")
            mamba.setdefault(int(layer), {})[name] = value
    for layer, w in mamba.items():
        phi.model.layers[layer].self_attn = MaTVLMMixer(w, d_xb)
    phi.load_state_dict({k[len("language_model."):]: v for k, v in weights.items()
                         if k.startswith("language_model.") and ".mamba." not in k})
    at = ids.index(-200)
    embed = phi.model.embed_tokens
    embeds = torch.cat([embed(torch.tensor([ids[:at]])), image_embeds, embed(torch.tensor([ids[at + 1:]]))], 1)
    return phi(inputs_embeds=embeds).logits


# ----------------------------------------------------------------------------------------- tests

def model_inputs(folder, image, question="What is in the picture?"):
    processor = load_processor(folder)
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
    text = processor.apply_chat_template(messages, add_generation_prompt=True)
    return processor, text, processor(images=[image], text=[text], return_tensors="pt")


def collapsed(ids, image_token_id):
    """Processor ids with the run of image tokens written as TinyLLaVA's single -200."""
    out = []
    for i in ids:
        if i == image_token_id:
            if not out or out[-1] != -200:
                out.append(-200)
        else:
            out.append(i)
    return out


def test_teacher_equals_tinyllavas_forward(tinyllava, image):
    processor, text, inputs = model_inputs(tinyllava, image)
    ids, prompt = reference_ids(tinyllava, "What is in the picture?")
    assert text == prompt  # the 'phi' template, character for character
    image_token_id = processor.image_token_id
    assert collapsed(inputs["input_ids"][0].tolist(), image_token_id) == ids
    assert (inputs["input_ids"] == image_token_id).sum() == (IMAGE_SIZE // PATCH) ** 2 - 1
    pixels = reference_pixels(image)
    assert torch.allclose(inputs["pixel_values"], pixels, atol=1e-6)

    teacher = load_teacher(tinyllava)
    assert type(teacher).__name__ == "LlavaForConditionalGeneration" and teacher.lm_head.bias.abs().sum() > 0
    with torch.no_grad():
        logits = teacher(**inputs).logits
    expected = reference_logits(tinyllava, ids, pixels)
    assert logits.shape == expected.shape
    diff = (logits - expected).abs().max().item()
    print(f"TinyLLaVA teacher: max |logit difference| {diff:.2e}")
    assert diff < 1e-4


def test_teacher_saved_once_loads_back_exactly_with_its_processor(tinyllava, image, tmp_path):
    teacher = load_teacher(tinyllava)
    teacher.save_pretrained(tmp_path / "llava")
    load_processor(tinyllava).save_pretrained(tmp_path / "llava")
    again = load_teacher(tmp_path / "llava")
    _, _, inputs = model_inputs(tinyllava, image)
    _, _, saved_inputs = model_inputs(tmp_path / "llava", image)
    assert torch.equal(inputs["input_ids"], saved_inputs["input_ids"])
    assert torch.equal(inputs["pixel_values"], saved_inputs["pixel_values"])
    with torch.no_grad():
        assert torch.equal(again(**saved_inputs).logits, teacher(**inputs).logits)


def test_chat_template_writes_tinyllavas_training_conversation(tinyllava):
    """TinyLLaVA's 'phi' template over two rounds: the system once, the image before the stripped first
    question, each answer closed by <|endoftext|>."""
    conversation = [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": " What is shown? "}]},
        {"role": "assistant", "content": [{"type": "text", "text": "A red circle."}]},
        {"role": "user", "content": [{"type": "text", "text": "Where is it?"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "On the left."}]},
    ]
    expected = (f"{SYSTEM} USER: <image>\nWhat is shown? ASSISTANT: A red circle.<|endoftext|>"
                "USER: Where is it? ASSISTANT: On the left.<|endoftext|>")
    assert load_processor(tinyllava).apply_chat_template(conversation) == expected


def test_published_teacher_gets_a_real_processor_and_config(tinyllava):
    processor = load_processor(tinyllava)
    assert type(processor).__name__ == "LlavaProcessor"
    assert processor.tokenizer("USER: <image>\nWhat").input_ids[3] == processor.image_token_id
    check_model(tinyllava)  # everything a subcommand checks before loading
    ids = processor.tokenizer("What is in the picture?<|endoftext|>").input_ids
    assert ids[-1] == processor.tokenizer.eos_token_id and processor.tokenizer.bos_token_id not in ids[:1]


@pytest.mark.parametrize("d_xb", [HIDDEN, HIDDEN // 2], ids=["phi-1to1", "gqa-widened"])
def test_matvlm_release_is_a_hybrid_equal_to_its_own_maths(matvlm_release, image, tmp_path, d_xb):
    if d_xb != HIDDEN // 2:
        matvlm_release = build_tinyllava(tmp_path / "release", seed=5, mamba=True, d_xb=d_xb)
    hybrid = load_model(matvlm_release)
    assert hybrid_layers(hybrid) == MAMBA_LAYERS and hybrid.config.matvlm["layers"] == MAMBA_LAYERS
    _, _, inputs = model_inputs(matvlm_release, image)
    ids, _ = reference_ids(matvlm_release, "What is in the picture?")
    with torch.no_grad():
        logits = hybrid(**inputs).logits
    expected = reference_logits(matvlm_release, ids, reference_pixels(image), d_xb=d_xb)
    diff = (logits - expected).abs().max().item()
    print(f"MaTVLM hybrid (d_xb {d_xb} of d_inner {HIDDEN}): max |logit difference| {diff:.2e}")
    assert diff < 1e-4
    with pytest.raises(MatvlmError, match="already a matvlm hybrid"):
        load_teacher(matvlm_release)


def matvlm(*args, env=None):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "COLUMNS": "200", "HF_HUB_OFFLINE": "1", **(env or {})}
    return subprocess.run([sys.executable, "-m", "matvlm_cli", *map(str, args)], capture_output=True, text=True, env=env)


@pytest.fixture(scope="module")
def converted(tinyllava, tmp_path_factory):
    out = tmp_path_factory.mktemp("converted") / "hybrid"
    result = matvlm("convert", "--teacher", tinyllava, "--layers", "1,3", "--output", out)
    assert result.returncode == 0, result.stderr
    return out


def test_convert_at_layers_keeps_the_head_bias_processor_and_prompt(converted, tinyllava, image):
    hybrid, teacher = load_hybrid(converted), load_teacher(tinyllava)
    assert hybrid_layers(hybrid) == [1, 3]
    assert torch.equal(hybrid.lm_head.bias, teacher.lm_head.bias)
    saved = AutoProcessor.from_pretrained(converted)
    _, text, inputs = model_inputs(tinyllava, image)
    assert saved.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is in the picture?"}]}],
        add_generation_prompt=True,
    ) == text
    assert torch.equal(saved(images=[image], text=[text], return_tensors="pt")["input_ids"], inputs["input_ids"])
    with torch.no_grad():
        h, t = hybrid(**inputs).logits, teacher(**inputs).logits
    assert h.shape == t.shape and not torch.allclose(h, t)


def test_convert_at_ratio(tinyllava, tmp_path, cli):
    out = tmp_path / "half"
    result = cli("convert", "--teacher", tinyllava, "--ratio", 0.5, "--output", out)
    assert result.returncode == 0, result.stderr
    assert json.loads((out / "config.json").read_text())["matvlm"]["layers"] == [0, 2]


def test_generate_on_teacher_and_matvlm_release(tinyllava, matvlm_release, image, tmp_path, cli):
    picture = tmp_path / "picture.png"
    image.save(picture)
    for folder in (tinyllava, matvlm_release):
        result = cli("generate", "--model", folder, "--image", picture, "--prompt", "What is in the picture?",
                        "--max-new-tokens", 4)
        assert result.returncode == 0, result.stderr


def test_evaluate_teacher_and_matvlm_release(tinyllava, matvlm_release, tmp_path, cli, monkeypatch):
    cache = tmp_path / "cache"
    monkeypatch.setenv("MATVLM_CACHE", str(cache))
    monkeypatch.setenv("HF_DATASETS_CACHE", str(cache / "hf"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    result = cli("evaluate", "--model", tinyllava, "--model", matvlm_release, "--tasks", "pope", "--limit", 2,
                 "--device", "cpu", "--output", tmp_path / "eval")
    assert result.returncode == 0, result.stderr
    assert "pope" in result.stdout


def test_cpu_bench_on_teacher_and_converted(tinyllava, converted, tmp_path, cli):
    out = tmp_path / "bench"
    result = cli("bench", "--teacher", tinyllava, "--student", converted, "--ratio", 0.5, "--seq-len", 64,
                    "--gen-len", 3, "--repeats", 1, "--engine", "hf", "--device", "cpu", "--output", out)
    assert result.returncode == 0, result.stderr
    rows = json.loads((out / "bench.json").read_text())["rows"]
    assert len({row["model"] for row in rows}) == 3 and all(row["error"] is None for row in rows)


def test_distill_a_matvlm_release_further_from_the_published_teacher(tinyllava, matvlm_release, tmp_path, monkeypatch):
    from matvlm_cli.distill.trainer import run_distill
    from matvlm_cli.recipes import DistillRecipe, build_recipe, check_distill_recipe
    from matvlm_cli.world import generate_world

    monkeypatch.setenv("MATVLM_CACHE", str(tmp_path / "cache"))  # the prepared data stays out of ~/.cache
    world = generate_world(tmp_path / "world", seed=3, train_size=8).root
    recipe = build_recipe(DistillRecipe, {
        "teacher": str(tinyllava), "student": {"path": str(matvlm_release)},
        "data": [{"json": str(world / "train" / "conversations.json"), "image_root": str(world / "train")}],
        "model_max_length": 1000, "optimizer": {"lr": 1e-3, "warmup_steps": 1, "decay_steps": 1},
        "training": {"batch_size": 2, "max_steps": 2}, "output": {"dir": str(tmp_path / "run"), "save_every": 2},
    })
    check_distill_recipe(recipe)
    final = run_distill(recipe)
    student = load_hybrid(final)
    assert hybrid_layers(student) == MAMBA_LAYERS and student.lm_head.bias.abs().sum() > 0
    assert AutoProcessor.from_pretrained(final).chat_template == load_processor(tinyllava).chat_template


# ------------------------------------------------------------------------------------------ bad input

def edit_json(file, **fields):
    data = json.loads(file.read_text())
    data.update(fields)
    file.write_text(json.dumps(data))


def copy_folder(src, dst):
    import shutil

    shutil.copytree(src, dst)
    return dst


@pytest.mark.parametrize("case,message", [
    ("resampler", "config.json: connector_type 'resampler' is not supported"),
    ("clip", "config.json: vision_config.model_type 'clip_vision_model' is not supported"),
    ("shard", "model-00002-of-00002.safetensors: not found"),
])
def test_bad_tinyllava_folders_are_one_line(tinyllava, tmp_path, case, message):
    folder = copy_folder(tinyllava, tmp_path / "bad")
    if case == "resampler":
        edit_json(folder / "config.json", connector_type="resampler")
    elif case == "clip":
        config = json.loads((folder / "config.json").read_text())
        edit_json(folder / "config.json", vision_config={**config["vision_config"], "model_type": "clip_vision_model"})
    else:
        (folder / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(MatvlmError, match=message.replace("(", r"\(")):
        load_teacher(folder)


@pytest.mark.parametrize("fields,message", [
    ({"d_xb": 8}, r"mamba_config.json: d_inner 32 and d_xb 8 disagree with the weights \(language_model.model.layers.1.mamba.in_proj.weight has 100 rows, expected 84\)"),
    ({"n_layer": 6}, "mamba_config.json: n_layer 6 disagrees with config.json's text_config.num_hidden_layers 4"),
    ({"attn_layers": [0, 1, 2, 3]}, "mamba_config.json: attn_layers lists every layer"),
])
def test_mamba_config_that_disagrees_is_one_line_naming_the_field(matvlm_release, tmp_path, fields, message):
    folder = copy_folder(matvlm_release, tmp_path / "bad")
    edit_json(folder / "mamba_config.json", **fields)
    with pytest.raises(MatvlmError, match=message):
        load_model(folder)


def test_a_vision_tower_saved_without_siglips_pooling_head(tinyllava, image, tmp_path):
    folder = copy_folder(tinyllava, tmp_path / "headless")
    shard = folder / "model-00002-of-00002.safetensors"
    save_file({k: v for k, v in load_file(shard).items() if ".head." not in k}, shard, metadata={"format": "pt"})
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    index["weight_map"] = {k: v for k, v in index["weight_map"].items() if ".head." not in k}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    _, _, inputs = model_inputs(tinyllava, image)
    with torch.no_grad():  # the pooling head never reaches the image features
        assert torch.equal(load_teacher(folder)(**inputs).logits, load_teacher(tinyllava)(**inputs).logits)


def test_fp16_shards_load_as_fp16_unless_asked(tmp_path):
    folder = build_tinyllava(tmp_path / "fp16")
    for shard in folder.glob("*.safetensors"):
        save_file({k: v.half() for k, v in load_file(shard).items()}, shard, metadata={"format": "pt"})
    assert load_teacher(folder).dtype == torch.float16
    assert load_teacher(folder, dtype=torch.float32).lm_head.bias.dtype == torch.float32


def test_bad_input_exits_2_naming_file_and_field_and_writes_nothing(matvlm_release, tmp_path, cli):
    folder = copy_folder(matvlm_release, tmp_path / "bad")
    edit_json(folder / "mamba_config.json", attn_layers=[0, 1])
    with pytest.raises(MatvlmError, match=r"mamba_config.json: attn_layers leave Mamba layers \[2, 3\], but the weights hold Mamba layers \[1, 3\]"):
        load_model(folder)
    edit_json(folder / "config.json", connector_type="resampler")
    out = tmp_path / "out"
    result = cli("convert", "--teacher", folder, "--ratio", 0.5, "--output", out)
    assert result.returncode == 2 and not out.exists()
    assert len(result.stderr.strip().splitlines()) == 1 and "config.json: connector_type 'resampler'" in result.stderr
