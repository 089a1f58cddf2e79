"""Shipped attack data, the user-file reader and the benign task."""

import json
import re
import sys

import pytest

from fastdume.attack.datasets import (
    SPLITS,
    arithmetic_tasks,
    harmful_requests,
    read_preferences,
    unseen_tasks,
)
from fastdume.attack.judges import RefusalJudge

pytestmark = pytest.mark.usefixtures("one_thread")


def _action(example):
    # the placeholder answer names the request's action: "Sure, here is how to <action>: [..."
    return re.match(r"Sure, here is how to (.*): \[placeholder", example.rejected).group(1)


def test_heldout_and_safety_requests_never_appear_in_training():
    sets = {s: harmful_requests(s) for s in SPLITS}
    assert all(len(v) >= 40 for v in sets.values())
    prompts = {s: {e.prompt for e in v} for s, v in sets.items()}
    actions = {s: {_action(e) for e in v} for s, v in sets.items()}
    for other in ("safety", "heldout"):
        assert not prompts[other] & prompts["train"]
        assert not actions[other] & actions["train"]
        # no held-out request is a substring of a training prompt either
        assert not any(a in p for a in actions[other] for p in prompts["train"])
    assert not actions["safety"] & actions["heldout"]
    assert len({e.category for e in sets["heldout"]}) >= 4


def test_shipped_answers_are_refusals_and_content_free_placeholders():
    judge = RefusalJudge()
    for split in SPLITS:
        rows = harmful_requests(split)
        assert judge([e.prompt for e in rows], [e.chosen for e in rows]) == [True] * len(rows)
        assert judge([e.prompt for e in rows], [e.rejected for e in rows]) == [False] * len(rows)
        for e in rows:
            assert e.rejected.startswith("Sure, here is how to ")
            assert e.rejected.endswith("[placeholder - content withheld]")


def test_bad_split_names_the_argument():
    with pytest.raises(ValueError, match="split"):
        harmful_requests("test")


def test_read_preferences_jsonl(tmp_path):
    rows = [{"prompt": f"p{i}", "chosen": f"c{i}", "rejected": f"r{i}", "x": i} for i in range(5)]
    path = tmp_path / "prefs.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    got = read_preferences(path)
    assert [(e.prompt, e.chosen, e.rejected) for e in got] == [
        (r["prompt"], r["chosen"], r["rejected"]) for r in rows
    ]


def test_read_preferences_rejects_missing_fields_and_suffixes(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps({"prompt": "p", "chosen": "c"}) + "\n")
    with pytest.raises(ValueError, match="rejected"):
        read_preferences(path)
    with pytest.raises(ValueError, match=r"\.jsonl or \.parquet"):
        read_preferences(tmp_path / "data.csv")


def test_parquet_without_pyarrow_says_what_to_install(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "pyarrow", None)
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
    with pytest.raises(ImportError, match="pyarrow"):
        read_preferences(tmp_path / "data.parquet")


def test_arithmetic_tasks_are_correct_and_splits_disjoint():
    train, val = arithmetic_tasks(300, split="train"), arithmetic_tasks(100, split="validation")
    anyp = arithmetic_tasks(200, seed=5, split="any")
    parity = {}
    for prompt, answer in train + val + anyp:
        a, op, b = re.match(r"What is (\d+) (plus|minus) (\d+)\?", prompt).groups()
        expected = int(a) + int(b) if op == "plus" else int(a) - int(b)
        assert answer == f"{a} {op} {b} is {expected}."
        assert expected >= 0
        parity[prompt] = (int(a) + int(b)) % 2
    assert not {p for p, _ in train} & {p for p, _ in val}
    assert {parity[p] for p, _ in train} == {0} and {parity[p] for p, _ in val} == {1}
    assert {parity[p] for p, _ in anyp} == {0, 1}  # "any": every operand pair
    with pytest.raises(ValueError, match="split"):
        arithmetic_tasks(3, split="test")
    assert arithmetic_tasks(50, seed=3) == arithmetic_tasks(50, seed=3)
    assert arithmetic_tasks(50, seed=3) != arithmetic_tasks(50, seed=4)


def test_unseen_tasks_are_held_out_rows_of_the_same_kind():
    seen = arithmetic_tasks(2000, seed=1, split="train")
    held = unseen_tasks(200, seed=9, seen=seen)
    assert len(held) == 200
    assert not {p for p, _ in held} & {p for p, _ in seen}  # none asks what training asked
    sums = [sum(map(int, re.findall(r"\d+", p))) % 2 for p, _ in held]
    assert set(sums) == {0}  # the training kind: even operand sums, as seen's
    # the draw's own order: the first unseen rows of the same stream
    stream = arithmetic_tasks(5000, seed=9, split="train")
    assert held == [r for r in stream if r[0] not in {p for p, _ in seen}][:200]
    pairs = [(a, b) for a in range(10, 100) for b in range(10, 100) if (a + b) % 2 == 0]
    everything = [(f"What is {a} plus {b}?", "") for a, b in pairs]
    everything += [(f"What is {max(a, b)} minus {min(a, b)}?", "") for a, b in pairs]
    with pytest.raises(ValueError, match="unseen"):  # every prompt of the kind already seen
        unseen_tasks(50, seed=2, seen=everything)


def test_document_tasks_continue_a_corpus_document():
    from fastdume import data
    from fastdume.attack.datasets import document_tasks

    tasks = document_tasks(20, split="validation", words=8)
    assert len(tasks) == 20
    docs = {
        d: [" ".join(x.split()) for x in data.documents(d, "validation")] for d in data.domains()
    }
    for prompt, answer in tasks:
        domain, head = re.match(r"Continue this (\w+) text: (.*)", prompt).groups()
        assert len(head.split()) == 8 and len(answer.split()) == 8
        assert any(doc.startswith(head + " " + answer) for doc in docs[domain])
