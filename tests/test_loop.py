import json
import random

import pytest

from eep.config import parse_config
from eep.errors import EepError
from eep.evaluator import FitnessWorker, SerialEvaluator
from eep.genome import Genome
from eep.journal import Evaluation, RunDir
from eep.loop import breed, make_toolbox, run_search, select, starts
from search_spaces import PruneSpace, build_schedule, crossover_matrices, mutate_noise
from tests.conftest import toy_config_dict

SPACE = PruneSpace(num_experts=8, top_k=2, layers=(0, 1, 2, 3), keep=4)


@pytest.fixture(scope="module")
def worker():
    return FitnessWorker(parse_config(toy_config_dict()))


class CountingEvaluator(SerialEvaluator):
    """The serial evaluator, recording which genomes it was asked to score."""

    def __init__(self, worker):
        super().__init__(worker)
        self.keys = []

    def imap(self, candidates):
        for evaluation in super().imap(candidates):
            self.keys.append(evaluation.genome.key)
            yield evaluation


def _journal(run):
    """Journal records without the wall-clock fields, for run-to-run comparison."""
    rows = [json.loads(line) for line in run.journal_path.read_text().splitlines()]
    for row in rows:
        del row["seconds"], row["worker"]
    return rows


def _run(path, worker, stop_after=None, **search):
    config = parse_config(toy_config_dict(**search))
    run = RunDir.create(path, config) if not (path / "config.yaml").exists() else RunDir.open(path)
    evaluator = CountingEvaluator(worker)
    summary = run_search(run, SPACE, evaluator, log=lambda m: None, stop_after=stop_after)
    return run, summary, evaluator


def test_search_is_deterministic_for_a_seed_and_never_reevaluates(tmp_path, worker):
    run_a, summary_a, ev_a = _run(tmp_path / "a", worker)
    run_b, summary_b, _ = _run(tmp_path / "b", worker)
    assert _journal(run_a) == _journal(run_b)
    assert summary_a == summary_b
    assert summary_a["evaluations"] == 16 and len(ev_a.keys) == 16
    assert len(set(ev_a.keys)) == 16  # no genome evaluated twice
    fitnesses = [row["fitness"] for row in _journal(run_a)]
    assert summary_a["best_fitness"] == max(fitnesses)
    assert json.loads(run_a.summary_path.read_text())["best_genome"] == summary_a["best_genome"]
    _, summary_c, _ = _run(tmp_path / "c", worker, seed=4)
    assert _journal(RunDir.open(tmp_path / "c")) != _journal(run_a)


def test_duplicate_children_are_bred_again_and_counted_never_evaluated(tmp_path, worker):
    """A space of 8 genomes (keep 7 of 8, one gene for all layers) searched to exhaustion: breeding
    keeps proposing evaluated genomes, which are counted in ``stats`` and bred again instead."""
    tiny = PruneSpace(num_experts=8, top_k=2, layers=(0, 1, 2, 3), keep=7, groups=((0, 1, 2, 3),))
    assert tiny.size() == 8
    config = parse_config(toy_config_dict(evaluations=8, initial=3))
    evaluator, stats = CountingEvaluator(worker), {}
    run_search(
        RunDir.create(tmp_path / "run", config), tiny, evaluator, log=lambda m: None, stats=stats
    )
    assert len(evaluator.keys) == len(set(evaluator.keys)) == 8
    assert stats["rebred"] > 0


def test_stop_and_resume_equals_uninterrupted(tmp_path, worker):
    whole, summary_whole, _ = _run(tmp_path / "whole", worker)
    for stop in (3, 6, 7, 11):  # inside the initial population, at its end, and while breeding
        path = tmp_path / f"stop{stop}"
        _, partial, _ = _run(path, worker, stop_after=stop)
        assert partial["evaluations"] == stop
        run, summary, ev = _run(path, worker)  # resume: reopen the same run directory
        assert len(ev.keys) == 16 - stop  # nothing evaluated twice across the stop
        assert _journal(run) == _journal(whole)
        assert summary == summary_whole


def test_resume_reevaluates_a_torn_journal_line(tmp_path, worker, capsys):
    whole, summary_whole, _ = _run(tmp_path / "whole", worker)
    path = tmp_path / "torn"
    run, _, _ = _run(path, worker, stop_after=9)
    text = run.journal_path.read_text()
    run.journal_path.write_text(text[: len(text) - 40])  # the crash cut the last line
    run, summary, ev = _run(path, worker)
    assert "torn last journal line" in capsys.readouterr().err
    assert len(ev.keys) == 16 - 8
    assert _journal(run) == _journal(whole) and summary == summary_whole


def test_resume_refuses_a_changed_config(tmp_path, worker):
    run, _, _ = _run(tmp_path / "r", worker, stop_after=2)
    run.config_path.write_text(run.config_path.read_text().replace("seed: 3", "seed: 4"))
    from eep.errors import EepError

    with pytest.raises(EepError, match=r"changed since the search started \(search.seed: 3 -> 4\)"):
        _run(tmp_path / "r", worker)


def test_breeding_draws_parents_from_the_threshold_pools():
    from eep.genome import Genome
    from eep.journal import Evaluation

    cfg = parse_config(toy_config_dict(crossover_prob=0.0, layer_prob=1.0, swap_prob=0.0)).search
    rng = random.Random(0)
    toolbox = make_toolbox(SPACE, cfg, rng)
    archive = [
        Evaluation(i, toolbox.individual(), fitness, {})
        for i, fitness in enumerate([90.0, 88.0, 80.0, 50.0])
    ]
    near = {0: [], 1: []}
    for _ in range(300):
        child = breed(toolbox, archive, cfg, rng)
        # with one forced swap the parent is the archive genome sharing 4*4-1 kept experts
        overlaps = [
            sum(len(set(child.keep(i)) & set(e.genome.keep(i))) for i in SPACE.layers)
            for e in archive
        ]
        parent = overlaps.index(max(overlaps))
        assert parent in (0, 1)  # only candidates within 3.0 points of the best are parents
        near[parent].append(child)
    assert near[0] and near[1]
    assert isinstance(child, Genome)


class FailingWorker(FitnessWorker):
    """Raises (as an out-of-memory would) for one genome."""

    def detailed(self, genome, split="search", **kwargs):
        if split == "search" and genome is not None and genome.key == self.poison:
            raise RuntimeError("CUDA out of memory (simulated)")
        return super().detailed(genome, split, **kwargs)


def test_an_evaluation_that_raises_is_a_failed_record_not_a_crash(tmp_path, worker):
    run, _, ev = _run(tmp_path / "ok", worker)
    poison = json.loads(run.journal_path.read_text().splitlines()[2])["key"]
    failing = FailingWorker.__new__(FailingWorker)
    failing.__dict__.update(worker.__dict__, poison=poison)
    config = parse_config(toy_config_dict())
    bad_run = RunDir.create(tmp_path / "bad", config)
    summary = run_search(bad_run, SPACE, SerialEvaluator(failing), log=lambda m: None)
    rows = [json.loads(line) for line in bad_run.journal_path.read_text().splitlines()]
    assert rows[2]["status"] == "failed" and rows[2]["fitness"] is None
    assert rows[2]["error"] == "RuntimeError: CUDA out of memory (simulated)"
    assert summary["evaluations"] == 16 and summary["failed"] == 1
    assert all(r["status"] == "ok" for i, r in enumerate(rows) if i != 2)


def test_failures_piling_up_stop_the_search_with_an_error(tmp_path, worker):
    """Every evaluation raising: the search stops after max_failures in a row, each journaled with
    its reason. max_failures is not part of the search's identity (its digest), so a run can be
    resumed with another limit."""
    failing = FailingWorker.__new__(FailingWorker)
    failing.__dict__.update(worker.__dict__, poison=None)
    failing.detailed = lambda genome, split="search", **_: (_ for _ in ()).throw(
        RuntimeError("disk on fire")
    )
    config = parse_config(toy_config_dict(max_failures=3))
    run = RunDir.create(tmp_path / "run", config)
    with pytest.raises(
        EepError, match=r"3 evaluations in a row failed \(the last: RuntimeError: disk on fire\)"
    ):
        run_search(run, SPACE, SerialEvaluator(failing), log=lambda m: None)
    rows = [json.loads(line) for line in run.journal_path.read_text().splitlines()]
    assert [r["status"] for r in rows] == ["failed"] * 3
    assert config.digest() == parse_config(toy_config_dict()).digest()


def _run_space(path, worker, search_space, stop_after=None, log=lambda m: None, **search):
    from eep.moe import MoEShape
    from search_spaces import build_schedule

    data = toy_config_dict(**search)
    data["search_space"] = search_space
    config = parse_config(data)
    run = RunDir.create(path, config) if not (path / "config.yaml").exists() else RunDir.open(path)
    schedule = build_schedule(
        config.search_space, MoEShape("mixtral", 8, 2, (0, 1, 2, 3), router_matrix=(True, 1.0))
    )
    evaluator = CountingEvaluator(worker)
    return run, run_search(run, schedule, evaluator, log=log, stop_after=stop_after), evaluator


MERGE = {"kind": "merge", "keep": 4, "merge_after": 10}


def test_prune_then_merge_schedule_and_its_resume(tmp_path, worker):
    run, summary, ev = _run_space(tmp_path / "whole", worker, MERGE)
    rows = _journal(run)
    assert len(rows) == 16 and len(set(ev.keys)) == 16
    genomes = [Genome.from_dict(r["genome"]) for r in rows]
    assert not any(g.is_merge for g in genomes[:10])
    assert all(g.is_merge for g in genomes[10:])
    # merge children start from pruned parents: every slot is still dominated by one source expert
    for g in genomes[10:]:
        for layer in range(4):
            merge, router = g.gene(layer).matrices(8)
            assert all(max(row) > 0.5 for row in merge) and all(max(row) > 0.5 for row in router)
    for stop in (9, 10, 13):  # just before, at and after the switch
        path = tmp_path / f"stop{stop}"
        _run_space(path, worker, MERGE, stop_after=stop)
        resumed, summary_resumed, ev_resumed = _run_space(path, worker, MERGE)
        assert len(ev_resumed.keys) == 16 - stop
        assert _journal(resumed) == rows and summary_resumed == summary


def test_budget_search_spends_the_budget_unevenly(tmp_path, worker):
    run, summary, _ = _run_space(tmp_path / "b", worker, {"kind": "prune", "budget": 14})
    genomes = [Genome.from_dict(r["genome"]) for r in _journal(run)]
    counts = [tuple(len(g.keep(i)) for i in range(4)) for g in genomes]
    assert all(sum(c) == 14 for c in counts) and len(set(counts)) > 3


def test_weight_groups_share_one_gene_through_both_phases(tmp_path, worker):
    run, _, _ = _run_space(tmp_path / "g", worker, {**MERGE, "groups": 2})
    genomes = [Genome.from_dict(r["genome"]) for r in _journal(run)]
    assert all(g.gene(0) == g.gene(1) and g.gene(2) == g.gene(3) for g in genomes)
    assert any(g.is_merge for g in genomes) and len({g.gene(0) for g in genomes}) > 5


@pytest.mark.parametrize("damage", ["delete", "garbage", "truncate", "edit"])
def test_resume_without_a_usable_snapshot_replays_the_journal(tmp_path, worker, damage):
    whole, summary_whole, _ = _run_space(tmp_path / "whole", worker, MERGE)
    path = tmp_path / damage
    # inside the merge phase: float genomes
    run, _, _ = _run_space(path, worker, MERGE, stop_after=12)
    state = run.state_path
    if damage == "delete":
        state.unlink()
    elif damage == "garbage":
        state.write_bytes(b"\x00\xff not json")
    elif damage == "truncate":
        state.write_text(state.read_text()[:200])
    else:  # valid JSON, wrong content: only the checksum can tell
        data = json.loads(state.read_text())
        data["next_id"] += 1
        state.write_text(json.dumps(data))
    messages = []
    resumed, summary, ev = _run_space(path, worker, MERGE, log=messages.append)
    assert len(ev.keys) == 16 - 12  # replayed records are not evaluated again
    assert _journal(resumed) == _journal(whole) and summary == summary_whole
    assert "replaying the 12 journal records" in " ".join(messages)
    why = {
        "delete": None,
        "garbage": "is corrupt",
        "truncate": "is corrupt",
        "edit": "fails its checksum",
    }[damage]
    assert why is None or any(why in m for m in messages), messages


def test_replay_refuses_a_journal_that_another_config_wrote(tmp_path, worker):
    from eep.errors import EepError

    run, _, _ = _run_space(tmp_path / "r", worker, MERGE, stop_after=8)
    run.state_path.unlink()
    rows = run.journal_path.read_text().splitlines()
    record = json.loads(rows[3])
    record["genome"] = Genome.from_keep(8, 2, {i: [0, 1, 2, 3] for i in range(4)}).to_dict()
    rows[3] = json.dumps(record)
    run.journal_path.write_text("\n".join(rows) + "\n")
    with pytest.raises(EepError, match="journal record 3 does not match a replay"):
        _run_space(tmp_path / "r", worker, MERGE)


@pytest.mark.parametrize(
    "family, section, message",
    [
        ("deepseek_v3", {"keep": 3}, "keep=3 must be a multiple of the model's 2 expert groups"),
        ("deepseek_v3", {"keep": 2}, "with at least 2 per group"),
        (
            "deepseek_v3",
            {"kind": "merge", "keep": 4, "merge_after": 4},
            "where eep searches uniform pruning only",
        ),
        ("deepseek_v3", {"budget": 8}, "where eep searches uniform pruning only"),
    ],
)
def test_schedules_a_family_cannot_export_are_refused_up_front(family, section, message):
    from eep.config import SearchSpaceConfig
    from eep.families import MoEShape

    shape = MoEShape(family, 8, 2, (1, 2, 3), *((2, 2) if family == "deepseek_v3" else (1, 1)))
    with pytest.raises(EepError, match=message):
        build_schedule(SearchSpaceConfig(**section), shape)


def test_budget_searches_every_ungrouped_family():
    from eep.config import SearchSpaceConfig
    from eep.families import MoEShape

    for family in ("qwen3_moe", "olmoe", "gpt_oss", "glm4_moe"):
        schedule = build_schedule(SearchSpaceConfig(budget=10), MoEShape(family, 8, 2, (1, 2, 3)))
        assert schedule.first.describe().startswith("budget")


def test_merge_keeps_selecting_routers_where_mixing_is_undefined():
    from eep.config import SearchSpaceConfig
    from eep.families import MoEShape
    from eep.moe import router_columns

    # GLM-4-MoE's sigmoid routing (no router matrix defined)
    schedule = build_schedule(
        SearchSpaceConfig(kind="merge", keep=4, merge_after=4), MoEShape("glm4_moe", 8, 2, (0, 1))
    )
    merge = schedule.phases[1][1]
    assert not merge.mix_router
    rng = random.Random(0)
    genome = Genome.from_keep(8, 2, {0: [0, 1, 2, 3], 1: [4, 5, 6, 7]})
    for _ in range(100):
        other = mutate_noise(genome, rng, merge, 0.5, 0.5, 0.1, 0.1)
        genome = crossover_matrices(genome, other, rng, merge, 0.5)
        assert all(router_columns(genome.gene(i), 8) is not None for i in (0, 1))
    assert genome.is_merge


@pytest.fixture(scope="module")
def chunked_worker():
    """Scores the toy's 24 search examples in three chunks of 8, so a candidate can be cut short."""
    data = toy_config_dict()
    data["fitness"]["batch_size"] = 8
    return FitnessWorker(parse_config(data))


@pytest.mark.parametrize("keep, validated", [(2, False), (3, False), (4, False), (2, True)])
def test_early_cut_leaves_the_search_unchanged(tmp_path, chunked_worker, keep, validated):
    """Same genomes in the same order and the same best as an uncut run; the cut candidates'
    bounds really lie below what they would have scored... and below the bar they were given.
    With validation examples, also the same ``select_top`` best the export is picked from."""
    space = PruneSpace(num_experts=8, top_k=2, layers=(0, 1, 2, 3), keep=keep)
    runs = {}
    for cut in (True, False):
        data = toy_config_dict(evaluations=40, initial=10, early_cut=cut, select_top=12)
        data["fitness"]["batch_size"] = 8
        data["search_space"]["keep"] = keep
        for task in data["fitness"]["tasks"] if validated else ():
            task["validation_size"] = 6
        run = RunDir.create(tmp_path / str(cut), parse_config(data))
        runs[cut] = run, run_search(run, space, SerialEvaluator(chunked_worker), log=lambda m: None)
    (cut_run, cut_summary), (full_run, full_summary) = runs[True], runs[False]
    cut_rows, full_rows = _journal(cut_run), _journal(full_run)
    assert [(r["id"], r["key"]) for r in cut_rows] == [(r["id"], r["key"]) for r in full_rows]
    assert cut_summary["best_genome"] == full_summary["best_genome"]
    assert cut_summary["best_fitness"] == full_summary["best_fitness"]
    cut = [(c, f) for c, f in zip(cut_rows, full_rows) if c["status"] == "cut"]
    assert cut_summary["cut"] == len(cut) and full_summary["cut"] == 0
    if keep == 2:
        assert cut  # at 2 of 8 some children are hopeless even this early
    for c, f in cut:
        assert f["status"] == "ok" and f["fitness"] <= c["cut"]
    for c, f in zip(cut_rows, full_rows):
        if c["status"] == "ok":
            assert c["fitness"] == f["fitness"] and c["scores"] == f["scores"]
    if validated:  # every one of the 12 best was scored in full in the cut run too

        def top(rows):
            ok = [r for r in rows if r["status"] == "ok"]
            return [r["id"] for r in sorted(ok, key=lambda r: (-r["fitness"], r["id"]))[:12]]

        assert top(cut_rows) == top(full_rows)


def test_records_keep_each_example_and_the_cut_orders_by_the_relatives_misses(
    tmp_path, chunked_worker
):
    """Every record keeps its examples' results (a cut one, those it scored), the journal
    round-trips them, and a candidate's examples come ordered by its nearest relatives' misses."""
    from eep.journal import Evaluation
    from eep.loop import example_order, task_order

    space = PruneSpace(num_experts=8, top_k=2, layers=(0, 1, 2, 3), keep=2)
    data = toy_config_dict(evaluations=30, initial=10)
    data["fitness"]["batch_size"] = 8
    data["search_space"]["keep"] = 2
    run = RunDir.create(tmp_path / "run", parse_config(data))
    run_search(run, space, SerialEvaluator(chunked_worker), log=lambda m: None)
    records = run.evaluations()
    sizes = {t.name: len(t.examples) for t in chunked_worker.scorers["search"].tasks}
    for e in records:
        assert {t: len(v) for t, v in e.examples.items()} == sizes
        assert ("." in "".join(e.examples.values())) == (e.cut is not None)
        if e.ok:  # a task's score is the share of its examples scored 1
            assert all(e.scores[t] == 100 * v.count("1") / len(v) for t, v in e.examples.items())
        assert Evaluation.from_dict(e.to_dict()) == e
    assert any(e.cut is not None for e in records)

    tasks = list(sizes)
    genome = Genome.from_keep(8, 2, {i: [0, 1] for i in range(4)})
    near = Genome.from_keep(8, 2, {i: [0, 1] for i in range(3)} | {3: [0, 2]})
    far = Genome.from_keep(8, 2, {i: [6, 7] for i in range(4)})
    blank = {t: "1" * n for t, n in sizes.items()}
    n1, n2 = sizes[tasks[1]], sizes[tasks[2]]
    archive = [
        Evaluation(0, far, 50.0, examples=blank | {tasks[0]: "0" * sizes[tasks[0]]}),
        Evaluation(
            1,
            near,
            None,
            cut=10.0,
            examples=blank | {tasks[1]: "1.0" + "1" * (n1 - 3), tasks[2]: "0" + "." * (n2 - 1)},
        ),
    ]
    order = example_order(archive, genome, tasks, neighbours=1)  # only the nearest counts
    assert order[:2] == ((tasks[1], 2), (tasks[2], 0)) and len(order) == sum(sizes.values())
    assert sorted(order) == sorted((t, i) for t, n in sizes.items() for i in range(n))
    # the nearer relative weighs more: its misses first, then those of the farther one (whose
    # results also stand in for the examples the cut one did not score), then the rest
    both = example_order(archive, genome, tasks, neighbours=2)
    assert both[:2] == order[:2]
    assert both[2 : 2 + sizes[tasks[0]]] == tuple((tasks[0], i) for i in range(sizes[tasks[0]]))
    assert both[2 + sizes[tasks[0]] :] == tuple(
        sorted(
            set(both) - set(both[: 2 + sizes[tasks[0]]]), key=lambda p: (tasks.index(p[0]), p[1])
        )
    )
    old = [Evaluation(0, far, 50.0, {t: 100.0 for t in tasks})]  # a journal without examples
    assert example_order(old, genome, tasks) == task_order(old, genome, tasks)
    # any order scores the same; the examples named come first, each example once
    scorer = chunked_worker.scorers["search"]
    chunks = scorer.chunks_for(order)
    assert [(t.name, i) for c in chunks for t, i in c] == list(order)
    partial = scorer.chunks_for([(tasks[1], 2), ("nope", 0), (tasks[1], 99), tasks[2]])
    flat = [(t.name, i) for c in partial for t, i in c]
    assert flat[: 1 + sizes[tasks[2]]] == [(tasks[1], 2)] + [
        (tasks[2], i) for i in range(sizes[tasks[2]])
    ]
    assert sorted(flat) == sorted(order)
    assert scorer(order=order) == scorer()


def test_parent_bar_lies_below_both_thresholds_and_the_pool_minimum():
    from eep.config import SearchConfig
    from eep.journal import Evaluation
    from eep.loop import parent_bar

    genome = Genome.from_keep(8, 2, {0: [0, 1]})
    archive = [
        Evaluation(i, genome, f) for i, f in enumerate([90.0, 89.5, 80.0, 70.0, 60.0, 50.0, 40.0])
    ]
    cfg = SearchConfig(crossover_pool_min=6, mutate_threshold=3.0, crossover_threshold=1.0)
    # the sixth best: a worse child never enters the crossover pool
    assert parent_bar(archive, cfg) == 50.0
    assert parent_bar(archive, SearchConfig(crossover_pool_min=2)) == 87.0  # best - 3
    # the export is picked among the 7 best: the bar is the 7th best fitness
    assert parent_bar(archive, SearchConfig(crossover_pool_min=2), export_top=7) == 40.0
    assert parent_bar(archive, SearchConfig(crossover_pool_min=2), export_top=8) is None
    # fewer than the pool minimum: anything could be a parent
    assert parent_bar(archive[:5], cfg) is None
    failed = Evaluation(9, genome, None, error="boom")
    assert parent_bar([*archive[:5], failed], cfg) is None


@pytest.mark.parametrize("in_flight", [1, 3])
def test_greedy_warm_start_cuts_options_it_cannot_take_and_decides_the_same(
    tmp_path, chunked_worker, in_flight
):
    """With the early cut, an option of a greedy batch is cut once it falls below the best option
    scored before it (or, in the swap pass, the fitness to beat): the same journal genomes, the same
    greedy result and the same search after it as without the cut, and a journal stopped in the
    greedy phase resumes to the same records."""
    from eep import greedy

    space = PruneSpace(num_experts=8, top_k=2, layers=(0, 1, 2, 3), keep=3)
    cost = greedy.cost(space)

    def config(cut):
        data = toy_config_dict(
            evaluations=cost + 20,
            initial=6,
            warm_start=["greedy"],
            early_cut=cut,
            in_flight=in_flight,
        )
        data["fitness"]["batch_size"] = 8
        data["search_space"]["keep"] = 3
        return parse_config(data)

    runs = {}
    for cut in (True, False):
        run = RunDir.create(tmp_path / str(cut), config(cut))
        evaluator = SerialEvaluator(chunked_worker, in_flight)
        runs[cut] = run, run_search(run, space, evaluator, log=lambda m: None)
    (cut_run, cut_summary), (full_run, full_summary) = runs[True], runs[False]
    cut_rows, full_rows = _journal(cut_run), _journal(full_run)
    assert [(r["id"], r["key"]) for r in cut_rows] == [(r["id"], r["key"]) for r in full_rows]
    assert cut_summary["best_genome"] == full_summary["best_genome"]
    cut = [(c, f) for c, f in zip(cut_rows[:cost], full_rows[:cost]) if c["status"] == "cut"]
    assert cut  # options that fell behind the batch's best
    for c, f in cut:  # each would have scored at most its bound
        assert f["status"] == "ok" and f["fitness"] <= c["cut"]
    for c, f in zip(cut_rows, full_rows):
        if c["status"] == "ok":
            assert c["fitness"] == f["fitness"]
    # and below the best option before it in its batch that the evaluator had handed back (or
    # the swap pass's fitness to beat), so it could not have been taken
    steps, start = greedy.steps(space), 0
    try:
        batch = next(steps)
        while True:
            rows = full_rows[start : start + len(batch)]
            for p, c in enumerate(cut_rows[start : start + len(batch)]):
                if c["status"] == "cut":
                    before = [r["fitness"] for r in rows[: max(p - in_flight + 1, 0)]]
                    floor = [] if batch.floor is None else [batch.floor]
                    assert rows[p]["fitness"] < max(before + floor)
            start += len(batch)
            batch = steps.send([r["fitness"] for r in rows])
    except StopIteration:
        pass
    expected, value, _ = greedy.run(
        greedy.steps(space),
        lambda gs: [chunked_worker.fitness(chunked_worker.scores(g)) for g in gs],
    )
    chosen = [r for r in cut_rows[:cost] if Genome.from_dict(r["genome"]) == expected]
    assert chosen and all(r["status"] == "ok" and r["fitness"] == value for r in chosen)

    stopped = RunDir.create(tmp_path / "stopped", config(True))
    with stopped.journal_path.open("a") as journal:
        for line in cut_run.journal_path.read_text().splitlines()[: cost // 2]:
            journal.write(line + "\n")
    resumed = run_search(
        stopped, space, SerialEvaluator(chunked_worker, in_flight), log=lambda m: None
    )
    assert _journal(stopped) == cut_rows

    def timeless(summary):  # the seconds the cut saved are measured, not decided
        return {k: v for k, v in summary.items() if k != "cut_seconds_saved"}

    assert timeless(resumed) == timeless(cut_summary)


def test_greedy_warm_start_is_journaled_counted_and_resumes_exactly(tmp_path, worker):
    """The greedy elimination runs as candidates 0..G-1 (its part-way steps marked outside the
    space), breeding continues from its result, and a journal cut anywhere — in the greedy phase,
    with no snapshot — resumes to the uninterrupted run's records."""
    from eep import greedy

    space = PruneSpace(num_experts=8, top_k=2, layers=(0, 1, 2, 3), keep=6)
    cost = greedy.cost(space)

    def config():
        data = toy_config_dict(evaluations=cost + 12, initial=6, warm_start=["greedy"])
        data["search_space"]["keep"] = 6
        return parse_config(data)

    full = RunDir.create(tmp_path / "full", config())
    summary = run_search(full, space, SerialEvaluator(worker), log=lambda m: None)
    rows = _journal(full)
    assert [r["id"] for r in rows] == list(range(cost + 12)) and summary["evaluations"] == cost + 12
    outside = [bool(r.get("outside")) for r in rows]
    assert outside == [space.reject(Genome.from_dict(r["genome"])) is not None for r in rows]
    # all but the last layer's last step
    assert sum(outside) == 4 * (8 + 7) - 7 and not any(outside[cost:])
    expected, value, _ = greedy.run(
        greedy.steps(space), lambda gs: [worker.fitness(worker.scores(g)) for g in gs]
    )
    assert summary["best_fitness"] >= value
    assert (
        Genome.from_dict(summary["best_genome"]).keep_map() != {} and space.reject(expected) is None
    )
    # what the search started from, found again from the journal alone: greedy's result
    ((name, start),) = starts(full, space)
    assert (
        name == "greedy elimination's result"
        and start.genome.key == expected.key
        and start.fitness == value
        and start.id < cost
    )

    # stopped during the greedy phase, snapshot lost
    cut = RunDir.create(tmp_path / "cut", config())
    with cut.journal_path.open("a") as journal:
        for line in full.journal_path.read_text().splitlines()[:50]:
            journal.write(line + "\n")
    assert starts(cut, space) == []  # greedy elimination has no result yet
    resumed = run_search(cut, space, SerialEvaluator(worker), log=lambda m: None)
    assert _journal(cut) == rows and resumed == summary


def test_the_pick_also_judges_what_the_search_started_from():
    """``select(..., also=...)``: the starts outside the ``top`` are judged after them; one better on
    validation is picked, and a tie goes to the earlier, the top's."""
    archive = [
        Evaluation(i, Genome.from_keep(8, 2, {0: [i % 8, (i + 1) % 8]}), 90.0 - i) for i in range(8)
    ]
    scores = {0: 70.0, 1: 75.0, 2: 72.0, 6: 80.0, 7: 75.0}
    judged = []

    def validate(genome, bar=None):
        i = next(e.id for e in archive if e.genome.key == genome.key)
        judged.append(i)
        return scores[i]

    chosen, tried = select(archive, validate, 3, also=[archive[6], archive[1]])
    assert judged == [0, 1, 2, 6] and chosen.id == 6 and tried[6] == 80.0
    scores[6] = 75.0
    judged.clear()
    chosen, _ = select(archive, validate, 3, also=[archive[7], archive[6]])
    assert judged == [0, 1, 2, 6, 7] and chosen.id == 1
