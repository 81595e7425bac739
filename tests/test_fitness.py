import json

import pytest

from eep.config import TaskConfig
from eep.errors import EepError
from fitness import toy_tasks
from fitness.generation import Example, Task, is_correct, score, weighted_fitness
from fitness.tasks import check_tasks, load_tasks


def test_toy_splits_are_disjoint_and_deterministic():
    for task in toy_tasks.TASKS:
        search = toy_tasks.examples(task, "search", 50)
        test = toy_tasks.examples(task, "test", 50)
        assert not {e.prompt for e in search} & {e.prompt for e in test}
        assert toy_tasks.examples(task, "test", 50) == test
        assert all(toy_tasks.split_of(task, e.prompt.split()[2:-1]) == "test" for e in test)
    assert toy_tasks.make_example("reverse", list("abc")).answer == "c b a"
    assert toy_tasks.make_example("shift", list("aop")).answer == "b p a"
    assert toy_tasks.make_example("unshift", list("bpa")).answer == "a o p"
    assert toy_tasks.make_example("rotate", list("abcd")).answer == "b c d a"
    assert toy_tasks.make_example("swap", list("abcde")).answer == "b a d c e"
    for s in toy_tasks.SYMBOLS:
        assert toy_tasks.solve("unlookup", toy_tasks.solve("lookup", [s])) == [s]


def test_metrics():
    assert is_correct("exact_match", " b  a ", ["b a"])
    assert not is_correct("exact_match", "b a c", ["b a"])
    assert is_correct("contains", "It was Paris.\nMore text", ["Paris", "France"])
    assert not is_correct("contains", "Lyon\nParis", ["Paris"])
    task = Task("t", (Example("p", ("x",)), Example("q", ("y", "z"))), "exact_match", 2.0)
    assert score(task, ["x", "z"]) == 100.0 and score(task, ["x", "w"]) == 50.0
    other = Task("u", (Example("p", ("x",)),), "exact_match", 1.0)
    assert weighted_fitness([task, other], {"t": 50.0, "u": 80.0}) == pytest.approx(60.0)


def _write_dataset(root):
    root.mkdir()
    for split, n in (("train", 10), ("validation", 4)):
        rows = [{"question": f"q{i}", "context": f"c{i}", "answers": {"text": [f"a{i}", f"b{i}"]},
                 "label": bool(i % 2)} for i in range(n)]
        (root / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(root)


def test_dataset_task_from_local_files(tmp_path):
    path = _write_dataset(tmp_path / "qa")
    cfg = TaskConfig(name="qa", dataset=path, prompt="{context} Q: {question} A:", answer="answers.text",
                     metric="contains", search_split="train", test_split="validation", search_size=6, test_size=50)
    search, = load_tasks([cfg], "search")
    test, = load_tasks([cfg], "test")
    assert len(search.examples) == 6 and len(test.examples) == 4  # capped at the split's size
    first = search.examples[0]
    i = first.prompt.split()[0][1:]
    assert first.prompt == f"c{i} Q: q{i} A:" and first.answers == (f"a{i}", f"b{i}")
    assert load_tasks([cfg], "search") == [search]  # seeded subset
    yes_no = cfg.model_copy(update={"answer": "label", "answer_map": {"true": "yes", "false": "no"}})
    assert {ex.answers for ex in load_tasks([yes_no], "test")[0].examples} == {("yes",), ("no",)}


@pytest.mark.parametrize("update, message", [
    ({"answer": "missing"}, "answer field 'missing' is missing"),
    ({"prompt": "{nope}"}, "prompt uses field 'nope'"),
    ({"search_split": "nosuch"}, "cannot load split 'nosuch'"),
])
def test_bad_dataset_tasks_fail_clearly(tmp_path, update, message):
    cfg = TaskConfig(name="qa", dataset=_write_dataset(tmp_path / "qa"), prompt="{question}", answer="answers.text",
                     search_split="train", test_split="validation").model_copy(update=update)
    with pytest.raises(EepError, match=message):
        load_tasks([cfg], "search")


@pytest.mark.parametrize("cfg, message", [
    (TaskConfig(name="x", dataset="toy:sort"), "unknown toy task"),
    (TaskConfig(name="x", dataset="toy:copy", test_split="dev"), "unknown split 'dev'"),
    (TaskConfig(name="x", dataset="rajpurkar/squad"), "needs 'prompt'"),
    (TaskConfig(name="x", dataset="d", prompt="{a", answer="b"), "malformed"),
    (TaskConfig(name="x", dataset="d", prompt="{a}", answer="b", search_split="t", test_split="t"), "must not be"),
])
def test_task_configs_are_checked_without_loading(cfg, message):
    with pytest.raises(EepError, match=message):
        check_tasks([cfg])
