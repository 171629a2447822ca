"""Preference pairs split by object (issue 14), and the name-overlap baseline the reward stage reports.

Held-out accuracy on `other` pairs must measure whether the reward model matches an answer to its question
on objects it never saw, not whether it remembers a paragraph: no object may be asked about, or offer its
paragraph, on both sides of the split. Pure functions and the stages' objectives on hand-made pairs: no
model is trained here (tests/test_posttrain.py runs the stages).
"""

from __future__ import annotations

import itertools

import numpy as np
import torch

from tasks.core.config import resolve_params
from tasks.data import chat_data, embedded
from tasks.dpo import DirectPreference
from tasks.eval import winrate
from tasks.reward import PreferenceRanking


def objects(source: str) -> set[str]:
    """The objects a pair is about: its question's and its rejected paragraph's."""
    qual, rest = source.removeprefix("embedded:").split("|")
    return {qual, rest.split(":", 1)[1]}


def crossing(sources: list[str], train: list[int], val: list[int]) -> set[str]:
    """Objects that some training pair and some held-out pair are both about."""
    seen = set().union(*(objects(sources[i]) for i in train))
    return seen & set().union(*(objects(sources[i]) for i in val))


def embedded_sources(n: int) -> list[str]:
    return [row["source"] for row in itertools.islice(embedded.preference_pairs(), n)]


def as_pairs(sources: list[str]) -> list[chat_data.Pair]:
    """Pairs as chat_data.preference_pairs builds them from rows, token ids made up (the split reads none)."""
    groups = chat_data.pair_groups(sources)
    return [
        chat_data.Pair([1, 2], [3], [4], chat_data.rejected_kind(s), groups[i]) for i, s in enumerate(sources)
    ]


def test_groups_link_every_pair_sharing_an_object():
    sources = [
        "embedded:m.a|other:m.b",  # a-b
        "embedded:m.c|truncated:m.c",
        "embedded:m.b|other:m.d",  # b-d: a, b, d one group through b
        "embedded:m.e|shuffled:m.e",
        "embedded:m.d|truncated:m.d",  # about d: with a, b
        "files data/pairs.jsonl#3",  # no object named: a group of its own
        "files data/pairs.jsonl#4",
    ]
    assert chat_data.pair_groups(sources) == ["m.a", "m.c", "m.a", "m.e", "m.a", "#5", "#6"]
    assert chat_data.pair_groups(list(reversed(sources))) == ["#0", "#1", "m.a", "m.e", "m.a", "m.c", "m.a"]


def test_split_by_group_keeps_groups_whole_and_the_val_size():
    groups = ["a", "a", "b", "c", "c", "c", "d", "e", "f", "g"]
    for seed in range(20):
        train, val = chat_data.split(10, 0.3, seed, groups)
        assert len(val) == 3 and sorted(train.tolist() + val.tolist()) == list(range(10))
        assert not {groups[i] for i in train} & {groups[i] for i in val}
    assert [x.tolist() for x in chat_data.split(10, 0.3, 5, groups)] == [
        x.tolist() for x in chat_data.split(10, 0.3, 5, groups)
    ]
    # Without groups: the seeded row permutation, as before (sft, and rows of any source).
    order = np.random.default_rng(5).permutation(10)
    assert chat_data.split(10, 0.3, 5)[1].tolist() == sorted(order[:3].tolist())
    # Rows of a source that names no object are groups of their own: the same split as without groups.
    alone = chat_data.pair_groups([f"files data/pairs.jsonl#{i}" for i in range(10)])
    assert [x.tolist() for x in chat_data.split(10, 0.3, 5, alone)] == [
        x.tolist() for x in chat_data.split(10, 0.3, 5)
    ]
    # One group larger than val's share and nothing else fits: the smallest group that leaves training rows.
    train, val = chat_data.split(4, 0.25, 0, ["x", "x", "y", "y"])
    assert len(val) == 2 and len(train) == 2


def test_reward_and_dpo_hold_out_objects_no_training_pair_shows():
    """The stages' own objectives on the first 600 embedded pairs: no object on both sides. The row split
    (the stages before issue 14) puts dozens of objects on both sides of these same pairs."""
    sources = embedded_sources(600)
    pairs = as_pairs(sources)
    ranking = PreferenceRanking(pairs, 0, 8, 1337, 0.25, 1)
    train = [i for i, p in enumerate(pairs) if any(p is q for q in ranking.train)]
    val = [i for i, p in enumerate(pairs) if any(p is q for q in ranking.val)]
    assert len(val) == 150 and not crossing(sources, train, val)
    assert sum(pairs[i].kind == "other" for i in val) > 30  # held-out `other` pairs to measure
    params = resolve_params("tiny", ["dpo.val_fraction=0.25"])
    dpo = DirectPreference(pairs, torch.zeros(len(pairs), 2), params.dpo, 0)
    assert not crossing(sources, dpo.train_idx.tolist(), dpo.val_idx.tolist())
    row_train, row_val = chat_data.split(600, 0.25, 1337)
    assert len(crossing(sources, row_train.tolist(), row_val.tolist())) > 5  # 9 objects (131 with mirrors)


def test_evaluate_holds_out_objects_no_preference_stage_trained_on():
    sources = embedded_sources(400)
    groups = chat_data.pair_groups(sources)
    params = resolve_params("tiny", [])
    lengths = [10] * 400
    rows, how = winrate.heldout_rows(params, lengths, 128, groups)
    assert len(rows) >= 30 and how.startswith("intersection")
    rlhf_train, rlhf_val = chat_data.rlhf_split(params.rlhf, lengths, 128, groups)
    assert set(rows) <= set(rlhf_val) and not crossing(sources, rlhf_train, rows)
    for val_fraction, seed in (
        (params.reward.val_fraction, params.reward.train.seed),
        (params.dpo.val_fraction, params.dpo.train.seed),
    ):
        train, _ = chat_data.split(400, val_fraction, seed, groups)
        assert not crossing(sources, train.tolist(), rows)


def test_name_overlap_against_a_hand_computation():
    prompt = "What does `json.JSONEncoder.encode` do?"
    assert chat_data.name_words(prompt) == {"json", "encoder", "encode"}
    assert chat_data.name_words("Explain `http.server.HTTPServer(server_address, bind_and_activate)`.") == {
        "http",
        "server",
        "address",
        "bind",
        "and",
        "activate",
    }
    right = "Return a JSON string representation of a Python data structure; encode it."  # json, encode: 2
    wrong = "Serialize obj as a JSON formatted stream to fp."  # json: 1
    assert chat_data.name_overlap(prompt, right, wrong) == 1.0
    assert chat_data.name_overlap(prompt, wrong, right) == 0.0
    assert chat_data.name_overlap(prompt, "Return the JSON text.", wrong) == 0.5  # 1 and 1: a tie
    # The reward stage's baseline metric: the mean verdict per kind over the held-out pairs.
    verdicts = [1.0, 0.0, 0.5, 1.0, 1.0]
    kinds = ["other", "other", "other", "truncated", ""]
    assert chat_data.accuracy_by_kind(verdicts, kinds, "val/name_overlap") == {
        "val/name_overlap/other": 0.5,
        "val/name_overlap/truncated": 1.0,
    }


def test_reward_stage_reports_the_baseline_on_its_held_out_pairs():
    """PreferenceRanking.evaluate: val/name_overlap/<kind> is the mean of the held-out pairs' verdicts,
    whatever the model; the model's own accuracy sits beside it."""
    pairs = [
        chat_data.Pair([5, 6], [7, 2], [8, 2], "other", "m.a", 1.0),
        chat_data.Pair([5, 6], [7, 2], [8, 2], "other", "m.c", 0.5),
        chat_data.Pair([5, 6], [9, 2], [8, 2], "truncated", "m.e", 0.0),
        chat_data.Pair([5, 6], [9, 2], [8, 2], "truncated", "m.f", 1.0),
    ]
    ranking = PreferenceRanking(pairs, 0, 4, 1337, 0.75, 1)
    assert len(ranking.val) == 3

    class Constant(torch.nn.Module):  # rewards every sequence 0: every held-out pair a loss (0 > 0 is false)
        def __init__(self) -> None:
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(()))

        def forward(self, tokens: torch.Tensor) -> torch.Tensor:
            return torch.zeros(tokens.shape, dtype=torch.float) * self.w

    metrics = ranking.evaluate(Constant())
    expected: dict[str, list[float]] = {}
    for p in ranking.val:
        expected.setdefault(p.kind, []).append(p.overlap)
    for kind, verdicts in expected.items():
        assert metrics[f"val/name_overlap/{kind}"] == sum(verdicts) / len(verdicts)
        assert metrics[f"val/accuracy/{kind}"] == 0.0
