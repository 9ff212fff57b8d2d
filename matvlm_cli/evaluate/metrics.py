"""Scoring rules for POPE, MMMU (validation) and TextVQA (validation), written from
lmms-eval's task definitions and the LLaVA evaluation scripts (docs/evaluate.md).

Pure Python and stdlib only: these are the functions that decide whether a number can be compared with a
paper, so they must be cheap to test and must not need torch or a GPU. Where lmms-eval and the older LLaVA
scripts disagree (POPE), both are offered and named after their source.
"""

from __future__ import annotations

import ast
import random
import re
from collections import defaultdict
from collections.abc import Iterable, Sequence

from matvlm_cli.errors import MatvlmError

__all__ = [
    "pope_lmms_eval", "pope_llava_script", "llava_yes_no",
    "parse_multi_choice", "parse_open", "eval_open", "mmmu_score", "mmmu_aggregate", "mmmu_subject",
    "MMMU_DOMAINS", "normalize_answer", "vqa_accuracy",
]

# --------------------------------------------------------------------------------------------------- POPE


def _binary_metrics(preds: Sequence[str], golds: Sequence[str], yes_ratio_of: Sequence[str]) -> dict:
    """Accuracy / precision / recall / F1 with "yes" as the positive class, in lmms-eval's formulas.

    A prediction that is neither "yes" nor "no" is wrong for accuracy and counts as none of TP/FP/FN, so it
    leaves both denominators. With predictions that are always yes/no (LLaVA script) these are the plain
    confusion-matrix metrics. Empty denominators give 0 rather than raising.
    """
    tp = sum(p == "yes" and g == "yes" for p, g in zip(preds, golds))
    fp = sum(p == "yes" and g == "no" for p, g in zip(preds, golds))
    fn = sum(p == "no" and g == "yes" for p, g in zip(preds, golds))
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    n = len(golds)
    return {
        "accuracy": sum(p == g for p, g in zip(preds, golds)) / n if n else 0.0,
        "precision": precision,
        "recall": recall,
        "f1": 2 * precision * recall / (precision + recall) if precision + recall else 0.0,
        "yes_ratio": sum(x == "yes" for x in yes_ratio_of) / n if n else 0.0,
        "num": n,
    }


def _gold_yes_no(gold: str) -> str:
    gold = gold.lower().strip()
    if gold not in ("yes", "no"):
        raise MatvlmError(f"POPE ground truth must be 'yes' or 'no', got {gold!r}")
    return gold


def _by_category(records: Iterable[tuple[str, str, str]]) -> dict[str, list[tuple[str, str]]]:
    groups: dict[str, list[tuple[str, str]]] = defaultdict(list)
    for prediction, gold, category in records:
        groups[category].append((prediction, gold))
    return dict(sorted(groups.items()))


def pope_lmms_eval(records: Iterable[tuple[str, str, str]]) -> dict:
    """POPE as lmms-eval's `pope` task scores it: all rows pooled, plus the same metrics per category.

    records: (prediction_text, gold "yes"/"no", category). pred = prediction.lower().strip() and it must EQUAL
    the gold, so "Yes." is wrong and a sentence is neither yes nor no. yes_ratio is the share of "yes" in the
    GROUND TRUTH (0.5 on POPE by construction), not in the predictions.
    Returns {accuracy, precision, recall, f1, yes_ratio, num, categories: {name: same keys}}.
    """
    groups = _by_category(records)

    def score(rows):
        preds = [p.lower().strip() for p, _ in rows]
        golds = [_gold_yes_no(g) for _, g in rows]
        return _binary_metrics(preds, golds, yes_ratio_of=golds)

    pooled = score([row for rows in groups.values() for row in rows])
    return {**pooled, "categories": {name: score(rows) for name, rows in groups.items()}}


def llava_yes_no(text: str) -> str:
    """LLaVA's eval_pope.py reading of an answer: keep the text before the first ".", drop commas, split on
    single spaces; "no" if a word is exactly "No", "not" or "no", else "yes". So "I cannot tell" and "NO" are
    "yes" (case-sensitive words), which is what TinyLLaVA's 87.2 and MaTVLM's 86.0 were computed with."""
    words = text.split(".")[0].replace(",", "").split(" ")
    return "no" if ("No" in words or "not" in words or "no" in words) else "yes"


def pope_llava_script(records: Iterable[tuple[str, str, str]]) -> dict:
    """POPE as the LLaVA scripts score it (the numbers in TinyLLaVA / MaTVLM papers).

    Every answer is mapped to yes/no by `llava_yes_no`; metrics are computed per category, and the reported
    number is the MEAN of the per-category F1 scores (unweighted). yes_ratio here is over PREDICTIONS (how
    often the model says yes), unlike lmms-eval's. Golds must be yes/no (the script took anything but "no"
    as "yes"; a malformed gold is refused here instead).
    Returns {mean_f1, mean_accuracy, categories: {name: {accuracy, precision, recall, f1, yes_ratio, num}}}.
    """
    categories = {}
    for name, rows in _by_category(records).items():
        preds = [llava_yes_no(p) for p, _ in rows]
        golds = [_gold_yes_no(g) for _, g in rows]
        categories[name] = _binary_metrics(preds, golds, yes_ratio_of=preds)
    k = len(categories)
    return {
        "mean_f1": sum(m["f1"] for m in categories.values()) / k if k else 0.0,
        "mean_accuracy": sum(m["accuracy"] for m in categories.values()) / k if k else 0.0,
        "categories": categories,
    }


# --------------------------------------------------------------------------------------------------- MMMU

MMMU_DOMAINS: dict[str, tuple[str, ...]] = {
    "Art and Design": ("Art", "Art_Theory", "Design", "Music"),
    "Business": ("Accounting", "Economics", "Finance", "Manage", "Marketing"),
    "Science": ("Biology", "Chemistry", "Geography", "Math", "Physics"),
    "Health and Medicine": (
        "Basic_Medical_Science", "Clinical_Medicine", "Diagnostics_and_Laboratory_Medicine", "Pharmacy",
        "Public_Health",
    ),
    "Humanities and Social Science": ("History", "Literature", "Sociology", "Psychology"),
    "Tech and Engineering": (
        "Agriculture", "Architecture_and_Engineering", "Computer_Science", "Electronics", "Energy_and_Power",
        "Materials", "Mechanical_Engineering",
    ),
}
OTHER_DOMAIN = "Other"
_SUBJECT_TO_DOMAIN = {subject: domain for domain, subjects in MMMU_DOMAINS.items() for subject in subjects}
_MMMU_ID = re.compile(r"^(?:validation|dev|test)_(.+?)_\d+$")


def parse_multi_choice(response: str, options: Sequence[str], rng_seed: int = 0) -> str:
    """The letter a free-text answer picks, by the official MMMU rules as lmms-eval runs them.

    1. Strip , . ! ? ; : ' from both ends (one character kind after another, as the official loop does) and
       pad with spaces. 2. Candidates are the first non-empty set among: "(A)" forms; "A " forms (letter then
       a space, lmms-eval's test; the original MMMU repo wants " A "); "A." forms (added by lmms-eval).
    3. If none and the response has more than 5 words, options whose text occurs (case-insensitively).
    4. Several candidates: the one whose last occurrence is latest, measured with "(X)", " X " (as upstream,
       so a letter that merely ends a word such as "DNA " loses), "X." or the option text; ties (all absent)
       keep the first, like numpy.argmax. lmms-eval measures "A." candidates with " X " too, which usually
       gives the FIRST of them; the spec's "last wins" is followed here instead.
    5. None: random.Random(rng_seed).choice(letters), the same every call (upstream seeds a global RNG once,
       so its guesses depend on call order).
    """
    letters = [chr(ord("A") + i) for i in range(len(options))]
    if not letters:
        raise MatvlmError("a multiple-choice question needs at least one option")
    for char in ",.!?;:'":
        response = response.strip(char)
    response = f" {response} "
    lower = response.lower()

    forms = (("({})", "({})"), ("{} ", " {} "), ("{}.", "{}."))  # (how it is found, how its position is found)
    for found, where in forms:
        candidates = [c for c in letters if found.format(c) in response]
        if candidates:
            positions = [response.rfind(where.format(c)) for c in candidates]
            break
    else:
        candidates = []
        if len(response.split()) > 5:
            texts = {c: str(text).lower() for c, text in zip(letters, options)}
            candidates = [c for c in letters if texts[c] in lower]
            positions = [lower.rfind(texts[c]) for c in candidates]
    if not candidates:
        return random.Random(rng_seed).choice(letters)
    return candidates[positions.index(max(positions))]  # first maximum, like numpy.argmax


_INDICATORS = ("could be ", "so ", "is ", "thus ", "therefore ", "final ", "answer ", "result ")
_TRIVIAL = {":", ",", ".", "!", "?", ";", "'"}
_NUMBER_PATTERNS = (
    re.compile(r"-?\b\d{1,3}(?:,\d{3})+\b"),  # 1,234,567
    re.compile(r"-?\d+(?:\.\d+)?[eE][+-]?\d+"),  # 6.02e23
    re.compile(r"-?(?:\d+\.\d+|\.\d+|\d+\b)(?![eE][+-]?\d+)(?![,\d])"),  # 3.14, .5, 42
)


def _normalize_open(text: str) -> list:
    """Official normalize_str: a number (commas allowed) becomes round(float, 2); otherwise lowercase, and a
    single character x becomes [" x", "x "] so that e.g. gold "b" is not found inside "about"."""
    text = text.strip()
    try:
        return [round(float(text.replace(",", "")), 2)]
    except ValueError:
        text = text.lower()
        return [f" {text}", f"{text} "] if len(text) == 1 else [text]


def parse_open(response: str) -> list:
    """Candidate answers (lowercased strings and floats) from a free-text answer, by the official MMMU rules.

    The response is stripped, its end periods removed and it is LOWERCASED before splitting into sentences on
    ". " + capital or newline, exactly as upstream, so in practice only newlines split. In each piece the
    shortest tail after an indicator ("is ", "answer ", ...; also "=" in the last piece) is kept unless it is a
    lone punctuation mark; with no tail anywhere the whole response is the one candidate. Numbers found in the
    kept pieces are added, everything is normalised, duplicates dropped (first occurrence order kept).
    """
    text = response.strip().strip(".").lower()
    pieces = re.split(r"\.\s(?=[A-Z])|\n", text)
    keys = []
    for index, piece in enumerate(pieces):
        indicators = _INDICATORS + (("=",) if index == len(pieces) - 1 else ())
        shortest = None
        for indicator in indicators:  # upstream's loop: an empty tail is replaced by the next one found
            if indicator in piece:
                tail = piece.split(indicator)[-1].strip()
                if not shortest or len(tail) < len(shortest):
                    shortest = tail
        if shortest and shortest.strip() not in _TRIVIAL:
            keys.append(shortest)
    keys = keys or [text]
    raw = keys + [number for key in keys for pattern in _NUMBER_PATTERNS for number in pattern.findall(key)]
    return list(dict.fromkeys(item for found in raw for item in _normalize_open(found)))


def eval_open(gold: str | Sequence[str], candidates: Sequence) -> bool:
    """Official MMMU open-question check over the LIST returned by `parse_open`.

    True iff a normalised gold string is a substring of a string candidate, or a float candidate equals a
    normalised gold number. gold may be one string or a list of acceptable strings.

    lmms-eval 0.3.5 through 0.7.x passed the first candidate as a plain string here, so the loop iterated its
    characters and open questions always scored 0 (issue #1436, fixed by PR #1471). This implementation does
    not reproduce that bug; a string `candidates` is refused so it cannot creep back in.
    """
    if isinstance(candidates, str):
        raise TypeError("eval_open takes the list from parse_open, not a string (the lmms-eval #1436 bug)")
    golds = [gold] if isinstance(gold, str) else list(gold)
    answers = [item for g in golds for item in _normalize_open(g)]
    for candidate in candidates:
        if isinstance(candidate, str):
            if any(isinstance(a, str) and a in candidate for a in answers):
                return True
        elif candidate in answers:
            return True
    return False


def mmmu_score(
    doc_id: str, question_type: str, gold: str | Sequence[str], response: str,
    options: str | Sequence[str] = (),
) -> bool:
    """Whether one MMMU answer is right. options may be the dataset's string holding a Python list.
    Multiple choice: the parsed letter equals the gold letter (or is in a gold list). Open: `eval_open`."""
    if question_type == "multiple-choice":
        if isinstance(options, str):
            options = ast.literal_eval(options)
        letter = parse_multi_choice(response, list(options))
        return letter == gold if isinstance(gold, str) else letter in gold
    if question_type == "open":
        return eval_open(gold, parse_open(response))
    raise MatvlmError(f"{doc_id}: question_type must be 'multiple-choice' or 'open', got {question_type!r}")


def mmmu_subject(doc_id: str) -> str:
    """The subject in an MMMU id: validation_Art_Theory_12 -> Art_Theory."""
    match = _MMMU_ID.match(doc_id)
    if not match:
        raise MatvlmError(f"not an MMMU id (expected validation_<Subject>_<n>): {doc_id!r}")
    return match.group(1)


def mmmu_aggregate(results: Iterable[tuple[str, bool]]) -> dict:
    """Overall, per-subject and per-domain accuracy from (doc_id, correct) pairs.

    Overall and each domain are plain means over their questions (the official instance-level accuracy,
    i.e. subject accuracies weighted by question count). Subjects outside the 30 official ones (e.g. a
    synthetic Counting) are grouped under "Other". Only domains with at least one question are listed.
    Returns {accuracy, num, subjects: {name: {accuracy, num}}, domains: {name: {accuracy, num}}}.
    """
    subjects: dict[str, list[bool]] = defaultdict(list)
    for doc_id, correct in results:
        subjects[mmmu_subject(doc_id)].append(bool(correct))
    domains: dict[str, list[bool]] = defaultdict(list)
    for subject, marks in subjects.items():
        domains[_SUBJECT_TO_DOMAIN.get(subject, OTHER_DOMAIN)].extend(marks)

    def summary(marks: list[bool]) -> dict:
        return {"accuracy": sum(marks) / len(marks) if marks else 0.0, "num": len(marks)}

    order = [*MMMU_DOMAINS, OTHER_DOMAIN]
    return {
        **summary([m for marks in subjects.values() for m in marks]),
        "subjects": {name: summary(marks) for name, marks in sorted(subjects.items())},
        "domains": {name: summary(domains[name]) for name in order if name in domains},
    }


# ------------------------------------------------------------------------------------------------ TextVQA

_NUMBER_WORDS = {
    "none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5", "six": "6",
    "seven": "7", "eight": "8", "nine": "9", "ten": "10",
}
_ARTICLES = {"a", "an", "the"}
_PUNCTUATION = [";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",", "?", "!"]
# EvalAI's period rule, typo included: "(?!<=\d)" is a look-AHEAD for the text "<=digit" (upstream meant a
# look-behind), so a period is removed unless a digit follows: "3.5" keeps it, "5." and "end." lose it.
_PERIOD_STRIP = re.compile(r"(?!<=\d)(\.)(?!\d)")
_COMMA_BETWEEN_DIGITS = re.compile(r"(?<=\d)(\,)+(?=\d)")


def normalize_answer(text: str) -> str:
    """The EvalAI / VQA answer processor (as in lmms-eval's textvqa task), so "Two" == "2", "the dog" ==
    "dog", "dont" == "don't", "Coca-Cola" == "coca cola".

    Lowercase; drop "," and "?"; "'s" -> " 's"; newlines/tabs to spaces; each punctuation mark is deleted if
    it touches a space somewhere in the text (or digits are comma-separated) and replaced by a space
    otherwise; periods not followed by a digit removed; number words zero..ten (and "none") -> digits;
    articles a/an/the dropped; the EvalAI contraction map applied word by word.
    """
    text = text.lower().replace(",", "").replace("?", "").replace("'s", " 's").strip()
    text = text.replace("\n", " ").replace("\t", " ").strip()
    out = text
    for mark in _PUNCTUATION:  # the test looks at the text before any replacement, as upstream does
        touches_space = mark + " " in text or " " + mark in text
        out = out.replace(mark, "" if touches_space or _COMMA_BETWEEN_DIGITS.search(text) else " ")
    out = _PERIOD_STRIP.sub("", out)
    words = [_NUMBER_WORDS.get(word, word) for word in out.split()]
    return " ".join(CONTRACTIONS.get(word, word) for word in words if word not in _ARTICLES)


def vqa_accuracy(prediction: str, answers: Sequence[str]) -> float:
    """VQA accuracy of one prediction against the (10) human answers, after `normalize_answer` on all.

    Leave-one-out: for each answer i, acc_i = min(1, #(the other answers equal to the prediction) / 3);
    the score is the mean of acc_i. With 10 answers and k matching: k=1 -> 0.3, 2 -> 0.6, 3 -> 0.9, >=4 -> 1.
    The dataset score is the mean over questions. No answers gives 0.
    """
    if not answers:
        return 0.0
    pred = normalize_answer(prediction)
    golds = [normalize_answer(a) for a in answers]
    matches = sum(g == pred for g in golds)
    per_answer = [min(1.0, (matches - (g == pred)) / 3) for g in golds]
    return sum(per_answer) / len(per_answer)


# The EvalAI contraction map, in full (entries with capitals such as "Im" can never fire after lowercasing;
# kept as upstream has them).
CONTRACTIONS = {
    "aint": "ain't", "arent": "aren't", "cant": "can't", "couldve": "could've", "couldnt": "couldn't",
    "couldn'tve": "couldn't've", "couldnt've": "couldn't've", "didnt": "didn't", "doesnt": "doesn't",
    "dont": "don't", "hadnt": "hadn't", "hadnt've": "hadn't've", "hadn'tve": "hadn't've", "hasnt": "hasn't",
    "havent": "haven't", "hed": "he'd", "hed've": "he'd've", "he'dve": "he'd've", "hes": "he's",
    "howd": "how'd", "howll": "how'll", "hows": "how's", "Id've": "I'd've", "I'dve": "I'd've", "Im": "I'm",
    "Ive": "I've", "isnt": "isn't", "itd": "it'd", "itd've": "it'd've", "it'dve": "it'd've", "itll": "it'll",
    "let's": "let's", "maam": "ma'am", "mightnt": "mightn't", "mightnt've": "mightn't've",
    "mightn'tve": "mightn't've", "mightve": "might've", "mustnt": "mustn't", "mustve": "must've",
    "neednt": "needn't", "notve": "not've", "oclock": "o'clock", "oughtnt": "oughtn't",
    "ow's'at": "'ow's'at", "'ows'at": "'ow's'at", "'ow'sat": "'ow's'at", "shant": "shan't",
    "shed've": "she'd've", "she'dve": "she'd've", "she's": "she's", "shouldve": "should've",
    "shouldnt": "shouldn't", "shouldnt've": "shouldn't've", "shouldn'tve": "shouldn't've",
    "somebody'd": "somebodyd", "somebodyd've": "somebody'd've", "somebody'dve": "somebody'd've",
    "somebodyll": "somebody'll", "somebodys": "somebody's", "someoned": "someone'd",
    "someoned've": "someone'd've", "someone'dve": "someone'd've", "someonell": "someone'll",
    "someones": "someone's", "somethingd": "something'd", "somethingd've": "something'd've",
    "something'dve": "something'd've", "somethingll": "something'll", "thats": "that's",
    "thered": "there'd", "thered've": "there'd've", "there'dve": "there'd've", "therere": "there're",
    "theres": "there's", "theyd": "they'd", "theyd've": "they'd've", "they'dve": "they'd've",
    "theyll": "they'll", "theyre": "they're", "theyve": "they've", "twas": "'twas", "wasnt": "wasn't",
    "wed've": "we'd've", "we'dve": "we'd've", "weve": "we've", "werent": "weren't", "whatll": "what'll",
    "whatre": "what're", "whats": "what's", "whatve": "what've", "whens": "when's", "whered": "where'd",
    "wheres": "where's", "whereve": "where've", "whod": "who'd", "whod've": "who'd've",
    "who'dve": "who'd've", "wholl": "who'll", "whos": "who's", "whove": "who've", "whyll": "why'll",
    "whyre": "why're", "whys": "why's", "wont": "won't", "wouldve": "would've", "wouldnt": "wouldn't",
    "wouldnt've": "wouldn't've", "wouldn'tve": "wouldn't've", "yall": "y'all", "yall'll": "y'all'll",
    "y'allll": "y'all'll", "yall'd've": "y'all'd've", "y'alld've": "y'all'd've", "y'all'dve": "y'all'd've",
    "youd": "you'd", "youd've": "you'd've", "you'dve": "you'd've", "youll": "you'll", "youre": "you're",
    "youve": "you've",
}
