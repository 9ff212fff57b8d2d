"""`matvlm convert --placement scored`: the layers chosen from calibration data, the ranking, the scores in
the hybrid's config, the chart, determinism, and bad input (one line, exit 2)."""

import json
import os

import pytest
import torch
from PIL import Image
from rich.console import Console
from test_errors import assert_one_line, matvlm

from matvlm_cli.hybrid.conversion import find_decoder
from matvlm_cli.hybrid.load import load_teacher
from matvlm_cli.hybrid.processors import load_processor
from matvlm_cli.placement import LayerScore, greedy_layers, load_calibration, pick_scored, score_layers

pytestmark = pytest.mark.usefixtures("one_thread")


def scores(costs):
    return [LayerScore(i, kl, kl * 2, 1.0) for i, kl in enumerate(costs)]


def test_pick_scored_takes_the_cheapest_layers():
    assert pick_scored(scores([0.5, 0.1, 0.3, 0.2]), 2) == ([1, 3], [])
    assert pick_scored(scores([0.5, 0.1, 0.3, 0.2]), 4)[0] == [0, 1, 2, 3]
    # Ties go to the lower index, so the choice never depends on the order of a set.
    assert pick_scored(scores([0.2, 0.2, 0.2, 0.1]), 2) == ([0, 3], [])


def test_pick_scored_keeps_global_layers_first_unless_the_scores_say_otherwise():
    windows = [16, 16, 16, None, 16, 16, 16, None]  # layers 3 and 7 are global
    # Global layers first even when every window layer is cheaper, then window layers cheapest first ...
    assert pick_scored(scores([0.1, 0.1, 0.1, 0.4, 0.1, 0.1, 0.1, 0.3]), 2, windows) == ([3, 7], [])
    assert pick_scored(scores([0.1, 0.3, 0.2, 0.4, 0.15, 0.2, 0.2, 0.3]), 3, windows) == ([0, 3, 7], [])
    # ... but a global layer that costs over five times the median layer goes last.
    assert pick_scored(scores([0.1, 0.2, 0.1, 5.0, 0.1, 0.1, 0.1, 0.3]), 2, windows) == ([0, 7], [3])
    assert pick_scored(scores([0.1, 0.2, 0.1, 0.45, 0.1, 0.1, 0.1, 0.3]), 2, windows) == ([3, 7], [])
    # Layers of one kind only: plain cheapest-first.
    assert pick_scored(scores([0.3, 0.1, 0.2]), 1, [None] * 3) == ([1], [])


@pytest.fixture(scope="module")
def calibration(tmp_path_factory):
    """A LLaVA-format data JSON with six image records and one text-only record."""
    root = tmp_path_factory.mktemp("calibration")
    records = []
    for i, color in enumerate(["red", "blue", "green", "red", "blue", "green"]):
        Image.new("RGB", (32, 32), color).save(root / f"{i}.png")
        records.append({"id": f"r{i}", "image": f"{i}.png", "conversations": [
            {"from": "human", "value": "<image>\nWhat color is the square?"}, {"from": "gpt", "value": f"The square is {color}."}]})
    records.append({"id": "text", "conversations": [{"from": "human", "value": "Hello?"}, {"from": "gpt", "value": "Hello."}]})
    (root / "data.json").write_text(json.dumps(records))
    return root / "data.json"


def test_convert_scored_ranks_layers_stores_scores_and_draws_them(tiny_teachers, calibration, tmp_path):
    out = tmp_path / "hybrid"
    result = matvlm("convert", "--teacher", tiny_teachers["llama"], "--placement", "scored", "--ratio", 0.5,
                    "--calibration", calibration, "--calibration-records", 4, "--output", out, env=os.environ | {"COLUMNS": "80"})
    assert result.returncode == 0, result.stderr
    assert "calibration: 4 image records" in result.stdout
    assert max(len(line) for line in result.stdout.splitlines()) <= 80
    block = json.loads((out / "config.json").read_text())["matvlm"]
    assert block["placement"] == "scored"
    table = {s["layer"]: s for s in block["placement_scores"]}
    assert sorted(table) == [0, 1, 2, 3]
    cheapest = sorted(table, key=lambda i: (table[i]["kl"], i))[:2]
    assert block["layers"] == sorted(cheapest)
    assert all(s["kl"] >= 0 and s["kl_unfitted"] >= 0 for s in table.values())
    # The fit lowers what converting a layer costs, on most layers at least (it fits the layer, not the KL).
    assert sum(s["kl"] < s["kl_unfitted"] for s in table.values()) >= 2
    assert block["placement_calibration"]["records"] == 4 and block["placement_calibration"]["source"] == str(calibration)
    rows = [[cell.strip() for cell in line.split("│")[1:-1]] for line in result.stdout.splitlines() if line.count("│") == 7]
    ranks = {row[0]: row for row in rows if row[0].isdigit()}
    assert sorted(ranks) == ["1", "2", "3", "4"]
    assert [ranks[str(r)][1] for r in (1, 2)] == [str(i) for i in cheapest]
    assert [ranks[str(r)][-1] for r in (1, 2, 3, 4)] == ["yes", "yes", "", ""]
    assert (out / "placement-scores.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_scores_are_deterministic_for_a_seed_and_leave_the_teacher_intact(tiny_teachers, calibration):
    teacher = load_teacher(tiny_teachers["qwen2"])
    processor = load_processor(tiny_teachers["qwen2"])
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    runs = []
    for _ in range(2):
        batches = load_calibration(str(calibration), None, processor, 3, 7, 512, Console()).batches
        runs.append(score_layers(teacher, find_decoder(teacher), batches, seed=7, fit_steps=4))
    assert runs[0] == runs[1]
    after = teacher.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert type(find_decoder(teacher).attention(0)).__name__.endswith("Attention")
    # The iterative variant: its first round is the plain scores, each later round scores the layers left
    # with the cheapest so far converted, and the teacher comes back whole.
    rounds = greedy_layers(teacher, find_decoder(teacher), batches, 2, seed=7, fit_steps=4)
    assert rounds[0] == runs[0] and len(rounds[1]) == len(runs[0]) - 1
    first = min(rounds[0], key=lambda s: (s.kl, s.layer)).layer
    assert first not in [s.layer for s in rounds[1]]
    assert all(torch.equal(before[k], v) for k, v in teacher.state_dict().items())
    # Another seed draws other records and initialises the mixers otherwise.
    other = score_layers(teacher, find_decoder(teacher),
                         load_calibration(str(calibration), None, processor, 3, 8, 512, Console()).batches, seed=8, fit_steps=4)
    assert other != runs[0]


def test_scored_bad_input_is_one_line(tiny_teachers, calibration, tmp_path, cli):
    teacher = tiny_teachers["llama"]
    base = ("convert", "--teacher", teacher, "--placement", "scored", "--output", tmp_path / "out")
    assert_one_line(cli(*base, "--calibration", tmp_path / "missing.json"), "calibration", "missing.json", "does not exist")
    empty = tmp_path / "empty.json"
    empty.write_text("[]")
    assert_one_line(cli(*base, "--calibration", empty), "calibration", "empty.json", "no records")
    text_only = tmp_path / "text.json"
    text_only.write_text(json.dumps([json.loads(calibration.read_text())[-1]]))
    assert_one_line(cli(*base, "--calibration", text_only), "text.json", "no image records")
    assert_one_line(cli(*base, "--count", 5), "count: 5", "decoder has (4)")
    assert_one_line(cli(*base, "--layers", "0,1"), "--placement scored", "--layers")
    assert_one_line(cli("convert", "--teacher", teacher, "--count", 9, "--output", tmp_path / "out"), "count: 9")
    assert not (tmp_path / "out").exists()
