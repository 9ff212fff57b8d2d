"""Questions about scenes in the three benchmark families the world mirrors (POPE existence with
`random` / `popular` / `adversarial` negatives; MMMU-style subjects as 4-option or open questions; TextVQA
reading with 10 human-like answers), plus captions for instruction-style training turns.

The prompt formatters reproduce the benchmark prompts exactly (lmms-eval's prompts; docs/evaluate.md) and the training
conversations use them, so a model trained on the world answers benchmark prompts in the right format.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass

from .scenes import (
    BACKGROUNDS,
    COLORS,
    KINDS,
    POSITIONS,
    SHAPES,
    SIZES,
    WORDS,
    Scene,
    SceneObject,
    sample_scene,
    world_statistics,
)

SHORT_ANSWER = "\nAnswer the question using a single word or phrase."
CHOICE_ANSWER = "\n\nAnswer with the option's letter from the given choices directly."
LETTERS = "ABCD"
IMAGE_TAG = "<image>"
MMMU_IMAGE = "<image 1>"
NEGATIVE_STRATEGIES = ("adversarial", "popular", "random")
POPE_TOP_K = 3  # POPE asks about the top 3 absent kinds; with one negative per image we draw one of them
SUBJECTS = ("Color", "Counting", "Shape", "Spatial_Reasoning", "Text_Reading")
SUBFIELDS = {
    "Color": "Color Naming", "Counting": "Object Counting", "Shape": "Shape Recognition",
    "Spatial_Reasoning": "Spatial Relations", "Text_Reading": "Text Recognition",
}
PLACES = {position: f"{'on' if position in ('left', 'right') else 'at'} the {position}" for position in POSITIONS}
COUNT_VALUES = tuple(str(n) for n in range(6))
NUMBER_VALUES = tuple(str(n) for n in range(100))
NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten")
CAPTION_PROMPTS = ("Describe the image.", "Describe the image briefly.", "What is in the image?")
TEXTVQA_WORD_QUESTIONS = ("what word is written in the image?", "what does the text say?", "what is written here?")
TEXTVQA_NUMBER_QUESTIONS = ("what number is shown?", "what number is written in the image?", "what is the number?")
# Multiple choice weighs most: mapping a seen answer to its option letter is the hardest skill for a
# tiny model (a session-1 teacher read words perfectly yet picked the right letter for them only half the time).
# Training also asks about `binding` negatives: an absent kind whose colour and shape are both in the
# picture, on different objects ("a pink star" beside a pink cross and an orange star). A teacher trained
# without them scored 0.88 on adversarial POPE (the bar is 0.90); 11 of its 12 errors were a "yes", and
# 7 of the 8 inspected asked about a kind sharing its colour or shape with something in the picture.
TRAINING_NEGATIVE_WEIGHTS = {"adversarial": 2, "popular": 1, "random": 1, "binding": 2}
TRAINING_FAMILY_WEIGHTS = {"caption": 1, "existence": 4, "choice": 5, "open": 2, "reading": 1}


def pope_prompt(question: str) -> str:
    return question.strip() + SHORT_ANSWER


def mmmu_prompt(question: str, options: list[str]) -> str:
    """Multiple choice (A, B, ... for any number of options) when options are given, open otherwise."""
    if not options:
        return f"{question}\n{SHORT_ANSWER}"
    lettered = "\n".join(f"{chr(ord('A') + i)}. {option}" for i, option in enumerate(options))
    return f"{question}\n{lettered}{CHOICE_ANSWER}"


def textvqa_prompt(question: str, ocr_tokens: list[str] | None = None) -> str:
    ocr = "\nReference OCR token: " + ", ".join(ocr_tokens) if ocr_tokens else ""
    return question.capitalize() + ocr + SHORT_ANSWER


def is_reading_prompt(prompt: str) -> bool:
    """Whether a training prompt is a TextVQA-style reading question (not a multiple-choice one)."""
    prompt = prompt.removeprefix(IMAGE_TAG + "\n")
    questions = [q.capitalize() for q in TEXTVQA_WORD_QUESTIONS + TEXTVQA_NUMBER_QUESTIONS]
    return prompt.endswith(SHORT_ANSWER) and any(prompt.startswith(q) for q in questions)


def reading_records(records: list[dict]) -> list[dict]:
    """The first reading turn of each LLaVA record that has one, as a one-turn record of its own."""
    found = []
    for record in records:
        turns = record["conversations"]
        for human, gpt in zip(turns[::2], turns[1::2]):
            if is_reading_prompt(human["value"]):
                prompt = IMAGE_TAG + "\n" + human["value"].removeprefix(IMAGE_TAG + "\n")
                found.append({"id": record["id"] + "-reading", "image": record["image"],
                              "conversations": [{"from": "human", "value": prompt}, {"from": "gpt", "value": gpt["value"]}]})
                break
    return found


def object_name(kind: tuple[str, str]) -> str:
    return f"{kind[0]} {kind[1]}"


def plural(noun: str) -> str:
    return noun + ("es" if noun.endswith(("s", "x")) else "s")


def existence_question(kind: tuple[str, str]) -> str:
    article = "an" if kind[0][0] in "aeiou" else "a"
    return f"Is there {article} {object_name(kind)} in the image?"


def sample_negative(scene: Scene, strategy: str, rng: random.Random) -> tuple[str, str]:
    """An absent kind, drawn as POPE draws negatives: any absent kind (`random`), one of the most
    frequent absent kinds (`popular`), or one of those co-occurring most with the present ones
    (`adversarial`)."""
    absent = [kind for kind in KINDS if kind not in scene.kinds]
    stats = world_statistics()
    if strategy == "random":
        return rng.choice(absent)
    if strategy == "popular":
        scores = {kind: stats.frequency[kind] for kind in absent}
    elif strategy == "adversarial":
        scores = {kind: sum(stats.cooccurrence[(present, kind)] for present in scene.kinds) for kind in absent}
    else:
        raise ValueError(f"unknown negative strategy {strategy!r}; expected one of {NEGATIVE_STRATEGIES}")
    return rng.choice(sorted(absent, key=scores.__getitem__, reverse=True)[:POPE_TOP_K])


def binding_negative(scene: Scene, rng: random.Random) -> tuple[str, str]:
    """An absent kind made of a present colour and a present shape (of different objects), else one
    sharing a colour or a shape with a present object, else any absent kind: a training-only negative
    that only a model binding each colour to its own shape answers right."""
    colors, shapes = {obj.color for obj in scene.objects}, {obj.shape for obj in scene.objects}
    absent = [kind for kind in KINDS if kind not in scene.kinds]
    crossed = [kind for kind in absent if kind[0] in colors and kind[1] in shapes]
    sharing = [kind for kind in absent if kind[0] in colors or kind[1] in shapes]
    return rng.choice(crossed or sharing or absent)


@dataclass(frozen=True)
class Question:
    """A question with its correct value and the values its multiple-choice distractors come from."""

    text: str
    answer: str
    domain: tuple[str, ...]
    explanation: str


def subject_question(subject: str, scene: Scene, rng: random.Random, image: str = MMMU_IMAGE) -> Question:
    """An MMMU-style question on `subject`; `image` is how the text refers to the picture."""
    return _SUBJECT_BUILDERS[subject](scene, rng, image)


def subjects_for(scene: Scene) -> tuple[str, ...]:
    return SUBJECTS if scene.text is not None else tuple(s for s in SUBJECTS if s != "Text_Reading")


def choice_options(question: Question, rng: random.Random) -> tuple[list[str], str]:
    """Four shuffled options (the answer and three distractors) and the answer's letter."""
    options = rng.sample([value for value in question.domain if value != question.answer], 3) + [question.answer]
    rng.shuffle(options)
    return options, LETTERS[options.index(question.answer)]


def _reference(scene: Scene, obj: SceneObject, by: str) -> str:
    """'the circle' / 'the red object', adding its place when the scene has another like it."""
    noun = f"the {obj.shape}" if by == "shape" else f"the {obj.color} object"
    twins = [other for other in scene.objects if getattr(other, by) == getattr(obj, by)]
    return noun if len(twins) == 1 else f"{noun} {PLACES[obj.position]}"


def _color_question(scene: Scene, rng: random.Random, image: str) -> Question:
    obj = rng.choice(scene.objects)
    ref = _reference(scene, obj, "shape")
    explanation = f"{ref.capitalize()} is {obj.color}."
    return Question(f"What color is {ref} in {image}?", obj.color, tuple(COLORS), explanation)


def _shape_question(scene: Scene, rng: random.Random, image: str) -> Question:
    obj = rng.choice(scene.objects)
    ref = _reference(scene, obj, "color")
    explanation = f"{ref.capitalize()} is a {obj.shape}."
    return Question(f"What shape is {ref} in {image}?", obj.shape, SHAPES, explanation)


def _position_question(scene: Scene, rng: random.Random, image: str) -> Question:
    obj = rng.choice(scene.objects)
    name, place = object_name(obj.kind), PLACES[obj.position]
    return Question(f"Where is the {name} in {image}?", obj.position, POSITIONS, f"The {name} is {place}.")


def _count_question(scene: Scene, rng: random.Random, image: str) -> Question:
    target = rng.choice(("objects", "shape", "color"))
    if target == "objects":
        what, count = "objects", len(scene.objects)
    elif target == "shape":
        shape = rng.choice(scene.objects).shape if rng.random() < 0.7 else rng.choice(SHAPES)
        what, count = plural(shape), sum(obj.shape == shape for obj in scene.objects)
    else:
        color = rng.choice(scene.objects).color if rng.random() < 0.7 else rng.choice(tuple(COLORS))
        what, count = f"{color} objects", sum(obj.color == color for obj in scene.objects)
    return Question(f"How many {what} are there in {image}?", str(count), COUNT_VALUES, caption(scene))


def _reading_question(scene: Scene, rng: random.Random, image: str) -> Question:
    if scene.text.isdigit():
        return Question(f"What number is shown in {image}?", scene.text, NUMBER_VALUES, caption(scene))
    return Question(f"What word is written in {image}?", scene.text.lower(), WORDS, caption(scene))


_SUBJECT_BUILDERS = {
    "Color": _color_question, "Counting": _count_question, "Shape": _shape_question,
    "Spatial_Reasoning": _position_question, "Text_Reading": _reading_question,
}


def caption(scene: Scene) -> str:
    """'A large red circle at the top left and a small blue star on the right. The background is white.'"""
    parts = [f"a {obj.size} {object_name(obj.kind)} {PLACES[obj.position]}" for obj in scene.objects]
    listed = parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]
    sentences = [listed[0].upper() + listed[1:] + "."]
    if scene.text is not None:
        sentences.append(f'The {"number" if scene.text.isdigit() else "word"} "{scene.text}" is written at the bottom.')
    sentences.append(f"The background is {scene.background}.")
    return " ".join(sentences)


def textvqa_question(scene: Scene, rng: random.Random) -> str:
    return rng.choice(TEXTVQA_NUMBER_QUESTIONS if scene.text.isdigit() else TEXTVQA_WORD_QUESTIONS)


def reference_answers(text: str, rng: random.Random) -> list[str]:
    """Ten answers varied the way TextVQA's annotators vary: mostly the plain reading, some with other
    case, an article, a plural or a number word, and a minority of wrong readings."""
    if text.isdigit():
        canonical = text
        variants = [f"number {text}", f"the number {text}"] + ([NUMBER_WORDS[int(text)]] if int(text) <= 10 else [])
        wrong = [str(n) for n in (int(text) - 1, int(text) + 1) if 0 <= n <= 99]
    else:
        canonical = text.lower()
        variants = [canonical.capitalize(), canonical.upper(), f"the {canonical}", plural(canonical)]
        wrong = [word for word in WORDS if word != canonical]
    n_wrong = rng.choice((0, 0, 1, 1, 2))
    n_variant = rng.randint(0, 3)
    answers = (
        [canonical] * (10 - n_wrong - n_variant)
        + [rng.choice(variants) for _ in range(n_variant)]
        + [rng.choice(wrong) for _ in range(n_wrong)]
    )
    rng.shuffle(answers)
    return answers


def training_conversation(scene: Scene, rng: random.Random) -> list[dict[str, str]]:
    """1-3 LLaVA turns over a mix of all families, in benchmark prompt formats; `<image>` opens turn one."""
    families = [family for family in TRAINING_FAMILY_WEIGHTS if family != "reading" or scene.text is not None]
    weights = [TRAINING_FAMILY_WEIGHTS[family] for family in families]
    turns: dict[str, tuple[str, str]] = {}  # keyed so that no prompt, and no caption, comes twice
    for _ in range(rng.randint(1, 3)):
        family = rng.choices(families, weights=weights)[0]
        prompt, answer = _training_turn(family, scene, rng)
        turns.setdefault(family if family == "caption" else prompt, (prompt, answer))
    messages = []
    for index, (prompt, answer) in enumerate(turns.values()):
        messages.append({"from": "human", "value": (IMAGE_TAG + "\n" if index == 0 else "") + prompt})
        messages.append({"from": "gpt", "value": answer})
    return messages


def _training_turn(family: str, scene: Scene, rng: random.Random) -> tuple[str, str]:
    """One (prompt, answer) pair of a family, in the prompt format of the benchmark it mirrors."""
    if family == "caption":
        return rng.choice(CAPTION_PROMPTS), caption(scene)
    if family == "existence":
        present = rng.random() < 0.5
        strategy = rng.choices(tuple(TRAINING_NEGATIVE_WEIGHTS), weights=tuple(TRAINING_NEGATIVE_WEIGHTS.values()))[0]
        if present:
            kind = rng.choice(scene.kinds)
        elif strategy == "binding":
            kind = binding_negative(scene, rng)
        else:
            kind = sample_negative(scene, strategy, rng)
        return pope_prompt(existence_question(kind)), "yes" if present else "no"
    if family == "reading":
        ocr_tokens = [scene.text] if rng.random() < 0.5 else None
        return textvqa_prompt(textvqa_question(scene, rng), ocr_tokens), scene.text.lower()
    question = subject_question(rng.choice(subjects_for(scene)), scene, rng, rng.choice((MMMU_IMAGE, "the image")))
    if family == "open":
        return mmmu_prompt(question.text, []), question.answer
    options, letter = choice_options(question, rng)
    return mmmu_prompt(question.text, options), letter


TOKEN_PATTERN = re.compile(r"\w+|[^\w\s]")


def world_corpus(n_scenes: int = 3000) -> list[str]:
    """Texts covering everything the world writes, for training a tokenizer on: every value a template
    can be filled with (all word cases and plurals, numbers 0-99, number words, letters), then the
    prompts, answers and explanations over a fixed sample of scenes, which passes through every
    template. Prompts keep the literal `<image>` and `<image 1>` tags."""
    values = [
        *COLORS, *BACKGROUNDS, *SHAPES, *map(plural, SHAPES), *SIZES, *POSITIONS, *PLACES.values(),
        *LETTERS, *NUMBER_VALUES, *NUMBER_WORDS, "yes", "no", IMAGE_TAG, MMMU_IMAGE,
    ]
    for word in WORDS:
        values += [word, word.upper(), word.capitalize(), plural(word), f"the {word}"]
    rng = random.Random("matvlm-world/corpus/v1")
    texts: list[str] = []
    for _ in range(n_scenes):
        scene = sample_scene(rng)
        texts += [turn["value"] for turn in training_conversation(scene, rng)]
        for subject in subjects_for(scene):
            question = subject_question(subject, scene, rng)
            texts += [question.text, question.explanation]
        if scene.text is not None:
            texts += [textvqa_question(scene, rng), *reference_answers(scene.text, rng)]
    return values + texts


def world_vocabulary() -> list[str]:
    """The sorted distinct tokens of `world_corpus()`, split by TOKEN_PATTERN (words, single punctuation)."""
    return sorted({token for text in world_corpus() for token in TOKEN_PATTERN.findall(text)})
