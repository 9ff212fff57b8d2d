"""Hand-made cases with known answers for the POPE, MMMU and TextVQA scoring rules."""

import random

import pytest

from matvlm_cli.errors import MatvlmError
from matvlm_cli.evaluate.metrics import (
    CONTRACTIONS,
    MMMU_DOMAINS,
    eval_open,
    llava_yes_no,
    mmmu_aggregate,
    mmmu_score,
    mmmu_subject,
    normalize_answer,
    parse_multi_choice,
    parse_open,
    pope_llava_script,
    pope_lmms_eval,
    vqa_accuracy,
)

approx = pytest.approx

# ------------------------------------------------------------------------------------------------- MMMU
OPTIONS = ["apple pie", "banana split", "cherry tart", "date loaf"]


@pytest.mark.parametrize("response, letter", [
    ("(B)", "B"),
    ("The answer is C.", "C"),
    ("B", "B"),
    ("D.", "D"),
    ("B.\nBecause it is sweet", "B"),  # only the "B." form matches
    ("I am fairly sure it is the cherry tart", "C"),  # no letter, 9 words: option text
    ("A is wrong, B is right, but actually D", "D"),  # several letters: the last wins
    ("(A) or maybe (C)", "C"),
    ("(C) is close but A is the one", "C"),  # "(X)" forms take priority over bare letters
    ("Not the apple pie but the banana split is correct", "B"),  # several option texts: the last wins
    ("The DNA is B", "B"),  # "A " inside "DNA " is a candidate but has no " A " position
])
def test_parse_multi_choice(response, letter):
    assert parse_multi_choice(response, OPTIONS) == letter


def test_parse_multi_choice_random_fallback_is_seeded_and_deterministic():
    # "cherry tart" has <= 5 words, so option texts are not searched: the answer is a seeded guess.
    expected = random.Random(0).choice("ABCD")
    assert expected == "D"  # so the test below would notice if the seed or the letters changed
    assert [parse_multi_choice("cherry tart", OPTIONS) for _ in range(3)] == ["D"] * 3
    assert parse_multi_choice("I do not know", OPTIONS) == "D"
    assert parse_multi_choice("cherry tart", OPTIONS, rng_seed=1) == random.Random(1).choice("ABCD") == "B"
    # with more than 5 words the same text is found
    assert parse_multi_choice("my final choice is the cherry tart", OPTIONS) == "C"


def test_parse_open_numbers_and_indicators():
    assert 1234.0 in parse_open("The total is 1,234.")
    assert parse_open("x = 3.14159") == [3.14]  # "=" in the last sentence, rounded to 2 decimals
    assert parse_open("Paris") == ["paris"]  # no indicator: the whole (lowercased) response
    assert parse_open("The answer is a") == [" a", "a "]  # single character padded both ways
    # each line is a sentence; shortest tail after an indicator in each
    assert parse_open("so the answer is -5\nThus it is 7") == [-5.0, 7.0]


def test_eval_open():
    assert eval_open("1234", parse_open("The total is 1,234."))
    assert not eval_open("1235", parse_open("The total is 1,234."))
    assert eval_open("3.14", parse_open("x = 3.14159"))
    assert eval_open("Paris", parse_open("I think the capital is Paris."))  # substring of a string candidate
    assert eval_open(["Lyon", "paris"], parse_open("It is Paris"))  # a list of acceptable golds
    # single-character gold: " a" / "a " must appear, so "about" does not contain gold "b"
    assert eval_open("a", parse_open("The answer is a"))
    assert not eval_open("b", parse_open("The answer is about"))
    with pytest.raises(TypeError):  # the lmms-eval #1436 bug: a string iterated as characters
        eval_open("12", "12")


def test_mmmu_score():
    options_string = str(OPTIONS)  # the HF parquet stores options as a string holding a Python list
    assert mmmu_score("validation_Art_1", "multiple-choice", "C", "The answer is C.", options_string)
    assert not mmmu_score("validation_Art_1", "multiple-choice", "B", "The answer is C.", OPTIONS)
    assert mmmu_score("validation_Math_2", "open", "1234", "The total is 1,234.")
    assert not mmmu_score("validation_Math_2", "open", "12", "The total is 1,234.")
    with pytest.raises(MatvlmError, match="validation_Math_3"):
        mmmu_score("validation_Math_3", "essay", "x", "y")


def test_mmmu_aggregate_subjects_and_domains():
    assert sum(len(subjects) for subjects in MMMU_DOMAINS.values()) == 30
    assert mmmu_subject("validation_Spatial_Reasoning_12") == "Spatial_Reasoning"
    with pytest.raises(MatvlmError):
        mmmu_subject("Art_Theory_12")
    results = [
        ("validation_Art_Theory_1", True), ("validation_Art_Theory_2", False), ("validation_Music_1", False),
        ("validation_Math_1", True), ("validation_Physics_5", True),
        ("validation_Counting_3", False), ("validation_Text_Reading_4", True),
    ]
    out = mmmu_aggregate(results)
    assert out["accuracy"] == approx(4 / 7) and out["num"] == 7  # plain mean over questions
    assert out["subjects"]["Art_Theory"] == {"accuracy": 0.5, "num": 2}
    assert out["subjects"]["Text_Reading"] == {"accuracy": 1.0, "num": 1}
    assert out["domains"] == {
        "Art and Design": {"accuracy": approx(1 / 3), "num": 3},  # 1 of 3 (Art_Theory x2 + Music)
        "Science": {"accuracy": 1.0, "num": 2},
        "Other": {"accuracy": 0.5, "num": 2},  # synthetic subjects
    }


# ---------------------------------------------------------------------------------------------- TextVQA
@pytest.mark.parametrize("raw, normalized", [
    ("The Cat", "cat"),
    ("a dog", "dog"),
    ("an apple", "apple"),
    ("Two", "2"),
    ("ten", "10"),
    ("dont", "don't"),
    ("Hello!", "hello"),
    ("Coca-Cola", "coca cola"),  # no space next to "-": replaced by a space
    ("coca - cola", "coca cola"),  # "-" next to a space: deleted
    ("end.", "end"),
    ("3.5", "3.5"),  # period inside a number kept
    ("1,000", "1000"),
    ("yes?", "yes"),
    ("man's hat", "man 's hat"),
    ("\tNike\n", "nike"),
])
def test_normalize_answer(raw, normalized):
    assert normalize_answer(raw) == normalized


def test_contraction_map_is_complete():
    assert len(CONTRACTIONS) == 120
    assert CONTRACTIONS["somebody'd"] == "somebodyd"  # upstream quirk, kept


@pytest.mark.parametrize("matching, expected", [
    # 10 answers, k equal to the prediction. Leaving out a matching answer leaves k-1 matches, leaving out
    # another leaves k: score = (k * min(1, (k-1)/3) + (10-k) * min(1, k/3)) / 10.
    (0, 0.0),
    (1, 0.3),  # (1*0 + 9*(1/3)) / 10 = 3/10
    (2, 0.6),  # (2*(1/3) + 8*(2/3)) / 10 = (2/3 + 16/3) / 10 = 6/10
    (3, 0.9),  # (3*(2/3) + 7*1) / 10 = (2 + 7) / 10
    (4, 1.0),  # (4*1 + 6*1) / 10
])
def test_vqa_accuracy_leave_one_out(matching, expected):
    answers = ["The Coca-Cola"] * matching + ["pepsi"] * (10 - matching)  # normalised: "coca cola"
    assert vqa_accuracy("coca cola", answers) == approx(expected)


def test_vqa_accuracy_normalises_prediction():
    assert vqa_accuracy("Two.", ["2"] * 10) == 1.0
    assert vqa_accuracy("three", ["2"] * 10) == 0.0
    assert vqa_accuracy("x", []) == 0.0


# ------------------------------------------------------------------------------------------------- POPE
# (prediction, gold, category) with the outcome under each rule:       lmms-eval     LLaVA script
POPE = [
    ("yes", "yes", "random"),  #                                        TP            TP
    ("Yes.", "yes", "random"),  #                                       wrong, none   TP
    ("no", "yes", "random"),  #                                         FN            FN
    ("no", "no", "popular"),  #                                         TN            TN
    ("yes", "no", "popular"),  #                                        FP            FP
    ("I cannot tell", "no", "popular"),  #                              wrong, none   FP ("yes")
    ("No, there is not.", "no", "adversarial"),  #                      wrong, none   TN
    ("yes", "yes", "adversarial"),  #                                   TP            TP
]


def test_llava_yes_no():
    assert llava_yes_no("Yes.") == "yes"
    assert llava_yes_no("No, there is not.") == "no"
    assert llava_yes_no("There is no dog.") == "no"
    assert llava_yes_no("I cannot tell") == "yes"
    assert llava_yes_no("Yes. There is no cat") == "yes"  # only the first sentence counts
    assert llava_yes_no("NO") == "yes"  # case-sensitive words, as the script


def test_pope_lmms_eval_pooled_and_per_category():
    out = pope_lmms_eval(POPE)
    # correct: rows 1, 4, 8 -> 3/8. TP = 2 (rows 1, 8), FP = 1 (row 5), FN = 1 (row 3).
    assert out["accuracy"] == approx(3 / 8)
    assert out["precision"] == approx(2 / 3) and out["recall"] == approx(2 / 3) and out["f1"] == approx(2 / 3)
    assert out["yes_ratio"] == approx(4 / 8)  # ground truth: rows 1, 2, 3, 8 are "yes"
    assert out["num"] == 8
    cats = out["categories"]
    assert sorted(cats) == ["adversarial", "popular", "random"]
    # random: TP 1, FP 0, FN 1 -> P 1, R 1/2, F1 2/3; accuracy 1/3; gold all yes
    assert cats["random"]["accuracy"] == approx(1 / 3) and cats["random"]["f1"] == approx(2 / 3)
    assert cats["random"]["recall"] == approx(0.5) and cats["random"]["yes_ratio"] == 1.0
    # popular: TP 0 -> P = R = F1 = 0; "I cannot tell" is not an FP
    assert cats["popular"]["precision"] == 0.0 and cats["popular"]["f1"] == 0.0
    assert cats["adversarial"] == approx(
        {"accuracy": 0.5, "precision": 1.0, "recall": 1.0, "f1": 1.0, "yes_ratio": 0.5, "num": 2})
    assert pope_lmms_eval([(" YES \n", "Yes", "random")])["accuracy"] == 1.0  # lower().strip() on both
    with pytest.raises(MatvlmError):
        pope_lmms_eval([("yes", "maybe", "random")])


def test_pope_llava_script_mean_f1_and_prediction_yes_ratio():
    out = pope_llava_script(POPE)
    cats = out["categories"]
    # random: preds yes, yes, no vs gold yes x3: TP 2, FN 1 -> P 1, R 2/3, F1 = 2*(2/3)/(5/3) = 0.8
    assert cats["random"] == approx(
        {"accuracy": 2 / 3, "precision": 1.0, "recall": 2 / 3, "f1": 0.8, "yes_ratio": 2 / 3, "num": 3})
    # popular: preds no, yes, yes vs gold no x3: TN 1, FP 2 -> F1 0; yes_ratio over PREDICTIONS = 2/3
    assert cats["popular"]["f1"] == 0.0 and cats["popular"]["yes_ratio"] == approx(2 / 3)
    assert cats["popular"]["accuracy"] == approx(1 / 3)
    assert cats["adversarial"]["f1"] == 1.0 and cats["adversarial"]["accuracy"] == 1.0
    assert out["mean_f1"] == approx((0.8 + 0.0 + 1.0) / 3)  # = 0.6, the number papers report
    assert out["mean_accuracy"] == approx((2 / 3 + 1 / 3 + 1.0) / 3)
