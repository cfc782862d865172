"""The teacher's context sources by hand: sibling choice, the memory store and its round trip,
first-available-wins per completion."""

import json

import pytest

from rlsd.engine.context import (
    Context,
    ContextMemory,
    choose_contexts,
    context_metrics,
    remember,
    sibling_index,
)


def test_sibling_is_the_shortest_other_correct_completion():
    correct = [True, False, True, True]
    lengths = [9, 3, 5, 5]
    assert sibling_index(correct, lengths, 1) == 2  # 5 tokens, the lower index of the tie
    assert sibling_index(correct, lengths, 2) == 3  # never itself: the other 5-token one
    assert sibling_index(correct, lengths, 3) == 2
    assert sibling_index(correct, lengths, 0) == 2
    assert sibling_index([False, True, False, False], [1, 2, 3, 4], 1) is None  # the only one
    assert sibling_index([False] * 4, [1] * 4, 0) is None


def test_memory_keeps_the_best_and_evicts_the_oldest():
    memory = ContextMemory(capacity=2)
    assert memory.offer("p1", "long answer", 1.0, 10, step=1)
    assert not memory.offer("p1", "longer answer", 1.0, 12, step=2)  # not better: kept
    assert not memory.offer("p1", "same length", 1.0, 10, step=2)  # a tie keeps the first
    assert memory.offer("p1", "short", 1.0, 4, step=3)  # fewer tokens at the same reward
    assert memory.offer("p1", "longest but best", 2.0, 30, step=4)  # a higher reward wins
    assert memory.get("p1").text == "longest but best" and memory.get("p1").step == 4
    memory.offer("p2", "b", 1.0, 1, step=5)
    memory.offer("p3", "c", 1.0, 1, step=6)  # over capacity: p1, stored longest ago, goes
    assert memory.get("p1") is None and len(memory) == 2
    memory.offer("p2", "b!", 1.0, 0, step=7)  # p2 is refreshed, so p3 is now the oldest
    memory.offer("p4", "d", 1.0, 1, step=8)
    assert memory.get("p3") is None and [k for k in memory.entries] == ["p2", "p4"]


def test_memory_round_trips_exactly_through_json():
    memory = ContextMemory(capacity=3)
    for step, key in enumerate(["a", "b", "c", "a"], start=1):
        memory.offer(key, f"{key}{step}", 1.0, 10 - step, step)
    restored = ContextMemory(capacity=3)
    restored.load_state_dict(json.loads(json.dumps(memory.state_dict())))
    assert restored.state_dict() == memory.state_dict()
    assert list(restored.entries) == ["b", "c", "a"]  # the order decides the next eviction
    restored.offer("d", "d", 1.0, 1, 9)
    memory.offer("d", "d", 1.0, 1, 9)
    assert restored.state_dict() == memory.state_dict() and restored.get("b") is None


def test_first_available_source_wins_per_completion():
    memory = ContextMemory(capacity=8)
    memory.offer("q2", "remembered 7", 1.0, 2, step=1)
    texts = ["x = 3", "y = 4", "it is 4", "4", "five", "six", "seven", "eight"]
    correct = [False, True, True, False, False, False, False, False]
    lengths = [3, 3, 2, 1, 1, 1, 1, 1]
    keys = ["q1"] * 4 + ["q2"] * 4
    refs = ["4"] * 4 + ["7"] * 4
    got = choose_contexts(["sibling", "memory"], refs, keys, texts, correct, lengths, 4, memory)
    assert got[0] == Context("sibling", "it is 4")  # the shorter of the two correct ones
    assert got[1] == Context("sibling", "it is 4")
    assert got[2] == Context("sibling", "y = 4")  # never itself
    assert got[3] == Context("sibling", "it is 4")
    assert got[4:] == [Context("memory", "remembered 7")] * 4  # no correct sibling in group 2
    only = choose_contexts(["sibling"], refs, keys, texts, correct, lengths, 4, None)
    assert only[4:] == [None] * 4
    with_ref = choose_contexts(
        ["sibling", "reference"], refs, keys, texts, correct, lengths, 4, None
    )
    assert with_ref[4] == Context("reference", "7")
    metrics = context_metrics(got, ["sibling", "memory"])
    assert metrics == {
        "teacher/context_sibling_frac": 0.5,
        "teacher/context_memory_frac": 0.5,
        "teacher/context_none_frac": 0.0,
    }
    assert context_metrics(only, ["sibling"])["teacher/context_none_frac"] == 0.5


@pytest.mark.parametrize("reference", ["", "   "])
def test_the_reference_is_always_available(reference):
    """As before the other sources existed: an empty reference still renders the template."""
    got = choose_contexts(["reference", "sibling"], [reference], ["q"], ["a"], [True], [1], 1, None)
    assert got == [Context("reference", reference)]


def test_remember_stores_only_correct_completions_for_later():
    memory = ContextMemory(capacity=4)
    stored = remember(
        memory,
        ["q1", "q1", "q2"],
        ["a", "bb", "c"],
        [1.0, 1.0, 0.0],
        [True, True, False],
        [2, 1, 1],
        step=3,
    )
    assert stored == 2 and memory.get("q1").text == "bb" and memory.get("q2") is None
