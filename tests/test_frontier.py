"""One search for the whole accuracy-size frontier: genomes of every size, NSGA-II parents in the
steady-state loop (deterministic, resumable), the front's invariants, held-out scores and
hypervolume, and the export of a front point."""

import json
import random
from dataclasses import replace

import pytest
import torch

from eep.config import parse_config
from eep.errors import EepError
from eep.evaluator import FitnessWorker, SerialEvaluator
from eep.evolution import hypervolume
from eep.genome import Genome
from eep.journal import Evaluation, RunDir
from eep.loop import front_of, fronts, kept_experts, nsga2_pool, run_search
from eep.moe import MoEShape
from search_spaces import FrontierSpace, TopKFrontierSpace, build_schedule
from tests.conftest import toy_config_dict

SPACE = FrontierSpace(8, 2, (0, 1, 2, 3))


def frontier_config(**search):
    data = toy_config_dict(**{"evaluations": 30, "initial": 10, **search})
    data["search"].update(objectives=["fitness", "kept_params"], population=8)
    del data["search_space"]["keep"]
    return data


def test_operators_stay_in_the_space_and_walk_the_size_axis():
    from deap import base

    cfg = parse_config(frontier_config()).search
    toolbox = base.Toolbox()
    SPACE.register(toolbox, cfg, random.Random(0))
    genomes = [toolbox.individual() for _ in range(60)]
    sizes = {kept_experts(g) for g in genomes}
    assert min(sizes) <= 14 and max(sizes) >= 26  # the initial population spans the sizes
    for a, b in zip(genomes, genomes[1:]):
        for child in (toolbox.mutate(a), toolbox.mate(a, b)):
            assert SPACE.reject(child) is None
        assert toolbox.mutate(a) != a  # a mutation always changes something
    mutants = [toolbox.mutate(genomes[0]) for _ in range(50)]
    assert {kept_experts(m) - kept_experts(genomes[0]) for m in mutants} >= {-1, 0, 1}
    assert "naming exactly the layers" in SPACE.reject(Genome.from_keep(8, 2, {0: [0, 1]}))
    # search.resize_prob is the chance a mutation changes the size (by one expert); with 0, a
    # mutation that swaps experts in every layer keeps it
    not_full = [g for g in genomes if kept_experts(g) < 32]
    for resize, changed in ((1.0, {-1, 1}), (0.0, {0})):
        settings = dict(resize_prob=resize, swap_prob=1.0, layer_prob=1.0, move_prob=0.0)
        toolbox = base.Toolbox()
        SPACE.register(toolbox, parse_config(frontier_config(**settings)).search, random.Random(1))
        assert {kept_experts(toolbox.mutate(g)) - kept_experts(g) for g in not_full} == changed


def _archive(points):
    """Evaluations with (fitness, experts kept in layer 0 beyond top-k of 2 in the others)."""
    out = []
    for i, (fitness, size) in enumerate(points):
        keep = {0: range(size), 1: [0, 1], 2: [0, 1], 3: [0, 1]}
        out.append(Evaluation(i, Genome.from_keep(8, 2, keep), fitness))
    return out


def test_fronts_partition_the_candidates_and_the_first_is_non_dominated():
    rng = random.Random(1)
    points = [(round(rng.uniform(0, 100), 1), rng.randint(2, 8)) for _ in range(80)]
    points += [points[3], points[3], (100.0, 2)]  # copies of one point, then of a front point
    points += [(100.0, 2)]
    archive = _archive(points) + [Evaluation(99, Genome.from_keep(8, 2, {0: [0, 1]}), None)]
    layered = fronts(archive)
    ids = [e.id for front in layered for e in front]
    assert sorted(ids) == list(range(len(points)))  # every candidate once; the failed one not

    def dominates(a, b):
        fa, sa, fb, sb = a.fitness, kept_experts(a.genome), b.fitness, kept_experts(b.genome)
        return fa >= fb and sa <= sb and (fa > fb or sa < sb)

    front = front_of(archive)
    assert [e.id for e in layered[0]].count(len(points) - 1) == 1  # copies share a front (DEAP)
    assert len(points) - 1 not in [e.id for e in front]  # but the frontier lists a point once
    assert {e.id for e in front} <= {e.id for e in layered[0]} and [
        kept_experts(e.genome) for e in front
    ] == sorted(kept_experts(e.genome) for e in front)
    assert not any(dominates(a, b) for a in front for b in front)
    for e in archive[: len(points)]:  # each candidate is on the front or dominated by/equal to it
        assert any(dominates(f, e) or (f.fitness, f.genome) == (e.fitness, e.genome) for f in front)
    for earlier, later in zip(layered, layered[1:]):  # no point dominates one of an earlier front
        assert not any(dominates(b, a) for a in earlier for b in later)


def test_fronts_of_active_parameters_sort_by_active_experts():
    """Every expert kept and the layers' top-k varying: the front runs over active experts (kept
    experts are the same for all and decide nothing)."""
    from eep.loop import active

    def genome(k0, k1):
        return Genome.from_keep(8, 2, {0: range(8), 1: range(8)}, {0: k0, 1: k1})

    archive = [
        Evaluation(0, genome(2, 2), 90.0),
        Evaluation(1, genome(1, 1), 70.0),
        Evaluation(2, genome(1, 2), 80.0),
        Evaluation(3, genome(2, 1), 60.0),
    ]
    layered = fronts(archive, size=active)
    assert [[e.id for e in f] for f in layered] == [[1, 2, 0], [3]]
    assert [e.id for e in front_of(archive, active)] == [1, 2, 0]


def test_nsga2_pool_is_deaps_selection_on_the_whole_archive():
    from deap import base, creator, tools

    rng = random.Random(2)
    archive = _archive([(round(rng.uniform(0, 100), 1), rng.randint(2, 8)) for _ in range(60)])
    if not hasattr(creator, "EepTestFitness"):
        creator.create("EepTestFitness", base.Fitness, weights=(1.0, -1.0))
        creator.create("EepTestPoint", list, fitness=creator.EepTestFitness)
    whole = []
    for e in archive:
        point = creator.EepTestPoint()
        point.fitness.values = (e.fitness, kept_experts(e.genome))
        point.id = e.id
        whole.append(point)
    for size in (4, 8, 16):
        expected = {p.id for p in tools.selNSGA2(whole, size)}
        pool = nsga2_pool(archive, size)
        assert {e.id for e, _, _ in pool} == expected
        assert pool == nsga2_pool(archive, size)  # deterministic


def test_consecutive_sizes_sharing_a_pick_are_listed_once():
    from eep.evolution import pick_runs

    picks = {str(k): {"id": i} for k, i in ((2, 7), (3, 9), (4, 9), (5, 9), (6, 4), (7, 9))}
    assert [(label, p["id"]) for label, p in pick_runs(picks)] == [
        ("2", 7),
        ("3–5", 9),
        ("6", 4),
        ("7", 9),  # the same pick again, not next to the others: its own entry
    ]
    assert pick_runs({}) == []


def test_max_params_names_a_better_front_point_that_fits_too():
    from eep.api import also_fits

    front = [
        {"id": 1, "kept_params": 100, "fitness": 60.0},
        {"id": 2, "kept_params": 140, "fitness": 80.0},
        {"id": 3, "kept_params": 150, "fitness": 80.0},
        {"id": 4, "kept_params": 200, "fitness": 90.0},
    ]
    summary = {"front": front, "objective": "kept_params"}
    pick = {"id": 9, "kept_params": 120, "fitness": 70.0}  # the largest uniform size within 160
    assert also_fits(summary, pick, 160)["id"] == 2  # 3 scores the same with more parameters
    assert also_fits(summary, pick, 139) is None  # nothing larger fits
    assert also_fits(summary, {**pick, "fitness": 85.0}, 160) is None  # nothing better fits


def test_hypervolume_by_hand():
    # 50 % accuracy at 40 % of the parameters, then 80 % at 60 %
    assert hypervolume([(50.0, 40), (80.0, 60), (30.0, 70)], 100) == pytest.approx(
        (50 * 60 + 30 * 40) / (100 * 100)
    )
    assert hypervolume([], 100) == 0.0


@pytest.fixture(scope="module")
def worker():
    return FitnessWorker(parse_config(toy_config_dict()))


SHAPE = MoEShape("mixtral", 8, 2, (0, 1, 2, 3))


def _planned(data):
    """The config as ``eep search`` stores it (``auto`` settings resolved), and its schedule."""
    from eep.evolution import METHOD, resolve

    config = parse_config(data)
    schedule = METHOD.plan(config, SHAPE)
    return resolve(config, schedule), schedule


def _search(path, worker, stop_after=None, log=lambda m: None):
    config, schedule = _planned(frontier_config())
    run = RunDir.create(path, config) if not (path / "config.yaml").exists() else RunDir.open(path)
    summary = run_search(run, schedule, SerialEvaluator(worker), log, stop_after)
    return run, summary


def _journal(run):
    rows = [json.loads(line) for line in run.journal_path.read_text().splitlines()]
    return [{k: v for k, v in r.items() if k not in ("seconds", "worker")} for r in rows]


def test_frontier_search_is_deterministic_and_resumes_exactly(tmp_path, worker):
    """Across its turn to the smallest size too (search.smallest_after: auto, from candidate 21 of
    30): stopped before it, resumed across it by replaying the journal, then from the snapshot."""
    lines = []
    whole, _ = _search(tmp_path / "whole", worker, log=lines.append)
    assert whole.config().search.smallest_after == 21  # stored resolved
    best = max(e.fitness for e in whole.evaluations() if kept_experts(e.genome) == 8)
    assert lines[-1].startswith("[eep]   30/30 evals")  # the last line says the phase's best
    assert lines[-1].endswith(f"(smallest size, best there {best:.2f})")
    again, _ = _search(tmp_path / "again", worker)
    assert _journal(whole) == _journal(again)
    _search(tmp_path / "cut", worker, stop_after=13)
    (tmp_path / "cut" / "state.json").unlink()  # and without a snapshot: replayed from the journal
    stopped, _ = _search(tmp_path / "cut", worker, stop_after=10)
    resumed, _ = _search(tmp_path / "cut", worker)
    assert _journal(resumed) == _journal(whole)
    sizes = [kept_experts(Genome.from_dict(r["genome"])) for r in _journal(whole)]
    assert len(set(sizes[:21])) >= 8  # one search, many sizes
    assert set(sizes[21:]) == {8}  # then top-k = 2 in each of the 4 layers only
    assert all(r["status"] == "ok" for r in _journal(whole))  # one chunk of examples: no cut


class _Fresh:
    """What the loop's proposals read of a run: its config, and no snapshot."""

    path = None

    def __init__(self, config):
        self._config = config

    def config(self):
        return self._config

    def load_state(self):
        return None

    def save_state(self, state):
        pass


def test_a_candidate_of_the_smallest_size_is_cut_only_below_the_bar_of_the_phase_to_come():
    """Before search.smallest_after a candidate of the smallest size gets the lower of the
    frontier's bar and the bar the smallest-size phase will have (that bar only rises); in that
    phase, the single-size bar among the candidates of that size."""
    from eep.loop import _Proposals, front_bar, parent_bar

    config, schedule = _planned(frontier_config(evaluations=60, smallest_after=40))
    small = schedule.phases[1][1]
    rng = random.Random(3)
    genomes = [small.genome({i: rng.sample(range(8), 2) for i in range(4)}) for _ in range(8)]
    # eight candidates of the smallest size within 1.4 points: the 8th best is above the best - 3
    archive = [Evaluation(i, g, 80.0 - 0.2 * i) for i, g in enumerate(genomes)]
    proposals = _Proposals(_Fresh(config), schedule, list(archive), len(archive), lambda m: None)
    child = small.genome({i: (2, 3) for i in range(4)})
    frontier = front_bar(archive, 8, 8)  # population 8: the 8th best no larger
    later = parent_bar(archive, config.search)  # min(best - 3, 6th best)
    assert frontier == pytest.approx(78.6) and later == 77.0
    assert proposals._bar(child) == later
    larger = FrontierSpace(8, 2, (0, 1, 2, 3)).genome({i: range(3) for i in range(4)})
    assert proposals._bar(larger) == frontier
    proposals.next_id = 40
    assert proposals._bar(child) == later


def test_the_smallest_phase_breeds_from_the_candidates_of_that_size(worker):
    """From search.smallest_after on, a child is a single-size search's child of the archive's
    candidates of the smallest size (the same RNG draws, the larger candidates unseen)."""
    from eep.loop import _Proposals, breed, make_toolbox

    config, schedule = _planned(frontier_config(smallest_after=10))
    assert [start for start, _ in schedule.phases] == [0, 10]
    smallest = schedule.phases[1][1]
    assert (smallest.kind, smallest.keep) == ("prune", 2)
    rng = random.Random(5)
    archive = [
        Evaluation(i, g, float(rng.randint(0, 100)))
        for i, g in enumerate(
            [
                FrontierSpace(8, 2, (0, 1, 2, 3)).genome({i: range(n) for i in range(4)})
                for n in (3, 4)
            ]
            + [smallest.genome({i: rng.sample(range(8), 2) for i in range(4)}) for _ in range(8)]
        )
    ]
    archive[0] = Evaluation(0, archive[0].genome, 100.0)  # the best overall keeps 3 a layer

    # candidates 0..9 landed before these proposals (as a warm start's): the next is candidate 10
    proposals = _Proposals(_Fresh(config), schedule, list(archive), len(archive), lambda m: None)
    state = proposals.rng.getstate()
    child = proposals._child()
    assert smallest.reject(child) is None
    rng = random.Random()
    rng.setstate(state)
    toolbox = make_toolbox(smallest, config.search, rng)
    assert child == breed(toolbox, archive[2:], config.search, rng)


@pytest.mark.parametrize("validated", [False, True])
def test_early_cut_leaves_the_frontier_unchanged(tmp_path, validated):
    """A multi-objective search with the early cut (chunks of 8 of the 24 search examples): the
    same genomes in the same order, the same front and the same picks as without it; a cut
    candidate would have scored at most its bound, below its bar, and enough candidates no larger
    than it outscored that bar."""
    worker_data = toy_config_dict()
    worker_data["fitness"]["batch_size"] = 8
    if validated:
        for task in worker_data["fitness"]["tasks"]:
            task["validation_size"] = 4
    worker = FitnessWorker(parse_config(worker_data))
    runs = {}
    for cut in (True, False):
        data = frontier_config(evaluations=80, initial=10, early_cut=cut, select_top=10)
        data["fitness"] = worker_data["fitness"]
        config, schedule = _planned(data)  # from candidate 56 on, the smallest size only
        run = RunDir.create(tmp_path / str(cut), config)
        runs[cut] = run, run_search(run, schedule, SerialEvaluator(worker), lambda m: None)
    (cut_run, cut_summary), (full_run, full_summary) = runs[True], runs[False]
    cut_rows, full_rows = _journal(cut_run), _journal(full_run)
    assert [(r["id"], r["key"]) for r in cut_rows] == [(r["id"], r["key"]) for r in full_rows]
    cut = [(c, f) for c, f in zip(cut_rows, full_rows) if c["status"] == "cut"]
    assert cut and cut_summary["cut"] == len(cut) and full_summary["cut"] == 0
    for c, f in cut:
        assert f["status"] == "ok" and f["fitness"] <= c["cut"]
    front = [e.id for e in front_of(cut_run.evaluations())]
    assert front == [e.id for e in front_of(full_run.evaluations())]
    assert not {c["id"] for c, _ in cut} & set(front)
    # every pick judges the select_top best within its size (or the best, without validation)
    top = 10 if validated else 1
    for max_size in range(8, 33, 4):

        def best(rows, max_size=max_size):
            within = [
                r
                for r in rows
                if r["status"] == "ok" and kept_experts(Genome.from_dict(r["genome"])) <= max_size
            ]
            ranked = sorted(
                within,
                key=lambda r: (
                    -r["fitness"],
                    -kept_experts(Genome.from_dict(r["genome"])),
                    r["id"],
                ),
            )
            return [r["id"] for r in ranked[:top]]

        assert best(cut_rows) == best(full_rows)


@pytest.mark.slow
def test_frontier_run_scores_its_front_and_exports_a_point(tmp_path):
    import eep
    from eep.model import load_model
    from eep.moe import adapter_for

    run = eep.search(frontier_config(), run_dir=tmp_path / "run", log=lambda m: None)
    summary = run.summary
    front = summary["front"]
    assert front and [p["kept_params"] for p in front] == sorted(p["kept_params"] for p in front)
    assert all(p["heldout"]["mean"] is not None for p in front)
    assert 0.0 < summary["hypervolume"] <= 1.0
    assert summary["hypervolume"] == hypervolume(
        [(p["heldout"]["mean"], p["kept_params"]) for p in front], summary["full_params"]
    )
    point = front[len(front) // 2]
    with pytest.raises(EepError, match="is neither on the frontier nor a pick") as refused:
        run.export(tmp_path / "no", point=-1, log=lambda m: None)
    on_front, _, off = (
        str(refused.value).split("the front points: ")[1].partition("; the picks off it: ")
    )
    assert [int(entry.split()[0]) for entry in on_front.split(", ")] == [p["id"] for p in front]
    ids = {p["id"] for p in front + list(summary["picks"].values())}
    listed = on_front.split(", ") + (off.split(", ") if off else [])
    assert sorted(int(entry.split()[0]) for entry in listed) == sorted(ids)  # each once
    report = run.export(tmp_path / "x", point=point["id"], log=lambda m: None)
    assert report["parameters"]["after"] == point["kept_params"]
    picks = summary["picks"]  # one per uniform size, the best within it (no validation here)
    # a size the search never reached below has no pick
    assert set(picks) <= {str(k) for k in range(2, 9)} and "8" in picks
    for keep, pick in picks.items():
        assert pick["kept_experts"] <= 4 * int(keep) and pick["validation"] is None
        within = [
            r
            for r in run.evaluations()
            if r.ok and sum(g.slots for _, g in r.genome.layers) <= 4 * int(keep)
        ]
        assert pick["fitness"] == max(r.fitness for r in within)
    smallest = min(picks, key=int)
    chosen = run.front_point(max_params=picks[smallest]["kept_params"])
    assert chosen["id"] == picks[smallest]["id"]

    genome = Genome.from_dict(point["genome"])
    model, tokenizer = load_model(run.config.model)
    exported, _ = load_model(
        parse_config({**frontier_config(), "model": {"path": str(tmp_path / "x")}}).model
    )
    ids = tokenizer(
        ["reverse : a b c d =", "lookup : p o n m ="], return_tensors="pt", padding=True
    )
    with torch.no_grad():
        with adapter_for(model).applied(genome):
            in_search = model(**ids).logits
        torch.testing.assert_close(exported(**ids).logits, in_search, atol=1e-5, rtol=0)
    eep_report = tmp_path / "run" / "report.md"
    from eep.report import write_report

    write_report(tmp_path / "run")
    text = eep_report.read_text()
    assert "## Frontier" in text and (tmp_path / "run" / "frontier.png").exists()
    assert "kept_params); the smallest size alone from evaluation 21" in text


@pytest.mark.parametrize(
    "update, message",
    [
        ({"search_space": {"keep": 2}}, "spans every size: remove search_space.keep"),
        ({"search": {"objectives": ["kept_params"]}}, "or \\[fitness, latency\\]"),
        ({"search": {"objectives": ["fitness", "fitness"]}}, "\\[fitness\\], \\[fitness, kept"),
        ({"search": {"smallest_after": 5}}, "must be at least initial \\(10\\) and below"),
        ({"search": {"smallest_after": 30}}, "and below evaluations \\(30\\)"),
        (
            {"search": {"objectives": ["fitness", "active_params"], "smallest_after": 20}},
            "applies to a search over kept parameters",
        ),
        (
            {
                "search": {"objectives": ["fitness"], "smallest_after": 20},
                "search_space": {"keep": 2},
            },
            "applies to a search over kept parameters",
        ),
    ],
)
def test_frontier_settings_are_checked(update, message):
    data = frontier_config()
    for section, values in update.items():
        data[section] = {**data[section], **values}
    with pytest.raises(EepError, match=message):
        parse_config(data)


def test_smallest_after_auto_is_the_last_share_of_a_kept_parameters_frontier(tmp_path):
    """``auto``: the last 30 % of the evaluations, none when that would start before ``initial``
    or for other searches; the plan says when; a run that stored ``auto`` unresolved refuses a
    budget that would move it (its journal would not match)."""
    import eep
    from eep.evolution import METHOD

    def smallest_from(objectives=("fitness", "kept_params"), **search):
        data = frontier_config(**search)
        data["search"]["objectives"] = list(objectives)
        return parse_config(data).search.smallest_from

    assert smallest_from(evaluations=1000, initial=60) == 700
    assert smallest_from(evaluations=30, initial=10) == 21
    assert smallest_from(evaluations=12, initial=10) is None  # 8 < initial
    assert smallest_from(smallest_after=None) is None
    assert smallest_from(smallest_after=12) == 12
    assert smallest_from(objectives=["fitness", "active_params"]) is None
    assert parse_config(toy_config_dict()).search.smallest_from is None
    config = parse_config(frontier_config(evaluations=1000, initial=60))
    lines = dict(METHOD.plan_lines(config, METHOD.plan(config, SHAPE)))
    assert lines["smallest size"] == (
        "from evaluation 700 on, only 2 experts in every layer; search.smallest_after: auto"
    )
    RunDir.create(tmp_path / "run", parse_config(frontier_config()))  # auto: from 21 of 30
    with pytest.raises(EepError, match="from evaluation 21, at that budget from evaluation 28"):
        eep.resume(tmp_path / "run", evaluations=40, log=lambda m: None)


def test_a_frontier_run_from_before_smallest_after_reads_as_without_it(tmp_path):
    """A run directory written before the setting existed has no ``smallest_after`` key: it bred on
    the whole front throughout, so it reads as ``null``, with the digest its snapshot holds."""
    import yaml

    config = parse_config(frontier_config(smallest_after=None))
    run = RunDir.create(tmp_path / "run", config)
    data = yaml.safe_load(run.config_path.read_text())
    del data["search"]["smallest_after"]
    run.config_path.write_text(yaml.safe_dump(data))
    old = RunDir.open(tmp_path / "run").config()
    assert old.search.smallest_after is None and old.search.smallest_from is None
    assert old.digest() == config.digest()
    assert "smallest_after" not in old.outcome()["search"]
    assert parse_config(frontier_config()).digest() != config.digest()  # auto decides the search


def test_frontier_plans_refuse_what_it_cannot_hold():
    from eep.evolution import METHOD

    config = parse_config(
        {**frontier_config(), "search": {**frontier_config()["search"], "warm_start": ["greedy"]}}
    )
    with pytest.raises(EepError, match="drop greedy from search.warm_start"):
        METHOD.plan(config, MoEShape("mixtral", 8, 2, (0, 1, 2, 3)))
    topk = frontier_config(warm_start=["naee"])
    topk["search"]["objectives"] = ["fitness", "active_params"]
    with pytest.raises(EepError, match="not over active_params: drop warm_start"):
        METHOD.plan(parse_config(topk), MoEShape("mixtral", 8, 2, (0, 1, 2, 3)))
    grouped = MoEShape("deepseek_v3", 8, 2, (1, 2), 2, 2)
    space = parse_config(frontier_config()).search_space
    with pytest.raises(EepError, match="routes within expert groups"):
        build_schedule(space, grouped, "kept_params")
    # every expert kept, each layer's top-k searched: the groups stay even
    assert isinstance(build_schedule(space, grouped, "active_params").first, TopKFrontierSpace)
    with pytest.raises(EepError, match="a latency frontier changes layer sizes"):
        build_schedule(space, grouped, "latency")
    with pytest.raises(EepError, match="latency frontier searches each layer's top-k"):
        build_schedule(space.model_copy(update={"top_k": 1}), SHAPE, "latency")


@pytest.mark.slow
def test_frontier_on_two_ray_actors_equals_serial(tmp_path):
    """Parents are judged on the archive a child is bred from, so two actors with two candidates
    in flight run the serial search with in_flight 2; the front and picks are scored on the actors."""
    import eep

    runs = {}
    for name, evaluator in (("serial", {}), ("ray", {"kind": "ray", "workers": 2})):
        data = frontier_config(in_flight=2, evaluations=20)
        data["evaluator"] = evaluator
        runs[name] = eep.search(data, run_dir=tmp_path / name, log=lambda m: None)
    assert _journal(runs["ray"].dir) == _journal(runs["serial"].dir)
    serial, ray = runs["serial"].summary, runs["ray"].summary
    assert [p["id"] for p in ray["front"]] == [p["id"] for p in serial["front"]]
    assert {k: p["id"] for k, p in ray["picks"].items()} == {
        k: p["id"] for k, p in serial["picks"].items()
    }
    assert ray["hypervolume"] == serial["hypervolume"]


@pytest.mark.slow
def test_a_latency_frontier_on_ray_actors_times_each_candidate_on_its_actor(tmp_path):
    """Each actor times what it scores; the full model is timed on an actor at the end."""
    import eep

    data = latency_config(in_flight=2, evaluations=12, initial=6, latency_repeats=1)
    data["evaluator"] = {"kind": "ray", "workers": 2}
    run = eep.search(data, run_dir=tmp_path / "ray", log=lambda m: None)
    records = run.evaluations()
    assert len({r.worker for r in records}) == 2 and all(r.latency > 0 for r in records)
    summary = run.summary
    assert summary["full_latency"] > 0 and len(summary["latency_noise"]) == 5
    assert summary["front"] and all("latency_ms" in p for p in summary["front"])


def test_an_active_parameters_frontier_searches_each_layers_top_k(tmp_path):
    """[fitness, active_params]: every expert kept, each layer routing to 1..top-k; the front is
    over active experts, the picks per top-k, and --max-params counts active parameters."""
    from deap import base

    import eep
    from eep.loop import active_experts

    space = TopKFrontierSpace(8, 2, (0, 1, 2, 3))
    toolbox = base.Toolbox()
    cfg = parse_config(frontier_config()).search
    space.register(toolbox, cfg, random.Random(0))
    genomes = [toolbox.individual() for _ in range(40)]
    assert {active_experts(g) for g in genomes} >= {4, 8}
    for a, b in zip(genomes, genomes[1:]):
        for child in (toolbox.mutate(a), toolbox.mate(a, b)):
            assert space.reject(child) is None and all(len(child.keep(i)) == 8 for i in range(4))
        assert toolbox.mutate(a) != a

    data = frontier_config(evaluations=24, initial=8)
    data["search"]["objectives"] = ["fitness", "active_params"]
    run = eep.search(data, run_dir=tmp_path / "run", log=lambda m: None)
    summary = run.summary
    assert summary["objective"] == "active_params" and set(summary["picks"]) <= {"1", "2"}
    front = summary["front"]
    assert [p["active_params"] for p in front] == sorted(p["active_params"] for p in front)
    assert all(p["kept_experts"] == 32 for p in front)  # every expert kept
    assert 0.0 < summary["hypervolume"] <= 1.0
    smallest = min(summary["picks"], key=int)
    pick = run.front_point(max_params=summary["picks"][smallest]["active_params"])
    assert pick["id"] == summary["picks"][smallest]["id"]
    from eep.report import write_report

    text = write_report(tmp_path / "run").read_text()
    assert "experts active per token (top-k per layer)" in text


def test_size_picks_validate_each_candidate_once():
    """The candidates of the size picks overlap (every genome of at most 3 experts a layer is one at
    4 too); with one memo each is scored on the validation examples in full at most once, and one
    cut short is scored again only for a lower bar; each pick is the one a fresh memo gives."""
    from eep.evolution import _pick

    data = toy_config_dict(select_top=4)
    for task in data["fitness"]["tasks"]:
        task["validation_size"] = 6
    config = parse_config(data)
    rng = random.Random(0)
    archive = [
        Evaluation(i, Genome.from_keep(8, 2, {0: rng.sample(range(8), rng.randint(2, 8))}), f)
        for i, f in enumerate([90.0, 88.0, 87.0, 86.0, 85.0, 84.0, 83.0, 82.0])
    ]

    class Counting:
        def __init__(self):
            self.calls = []

        def heldout(self, genome, split="test", cut_below=None, order=()):
            self.calls.append((genome.key, cut_below))
            score = float(len(genome.keep(0)))
            if cut_below is not None and score < cut_below:
                return None  # as a worker's cut scoring does
            return {t.name: score for t in config.fitness.tasks}

    shared, memo = Counting(), {}
    picks = [_pick(archive, size, config, shared, memo=memo) for size in range(2, 9)]
    size = {e.genome.key: len(e.genome.keep(0)) for e in archive}
    full = [key for key, bar in shared.calls if bar is None or size[key] >= bar]
    assert len(full) == len(set(full))  # each genome scored in full at most once
    for n, (key, bar) in enumerate(shared.calls):  # again only for a lower bar than it fell below
        earlier = [b for k, b in shared.calls[:n] if k == key]
        assert all(b is not None and (bar is None or bar < b) for b in earlier)
    unshared = Counting()
    fresh = [_pick(archive, size, config, unshared) for size in range(2, 9)]
    assert [(e and e.id, v) for e, v in picks] == [(e and e.id, v) for e, v in fresh]
    assert len(shared.calls) < len(unshared.calls)  # the sizes really shared candidates


@pytest.mark.slow
def test_a_frontier_beside_the_baselines_is_its_pick_at_their_size(tmp_path, capsys):
    """`eep baselines` on a frontier config: the search row is the frontier's pick at the baselines'
    size (not its best by search fitness, which keeps nearly every expert), and its picks at the
    sweep's sizes; the report says so, the last line of the search lists the picks held out, and a
    plain export asks for a point."""
    import yaml

    from eep.api import Run
    from eep.cli import main
    from eep.report import write_report

    data = frontier_config()
    data["baselines"] = {"methods": ["frequency"], "sweep": [2]}
    for task in data["fitness"]["tasks"]:  # picks made on validation examples
        task["validation_size"] = 4
    path = tmp_path / "frontier.yaml"
    path.write_text(yaml.safe_dump(data))
    run = tmp_path / "run"
    assert main(["baselines", str(path), "--run-dir", str(run)]) == 0  # runs the search first
    err = capsys.readouterr().err
    assert "held out, the pick at each size (experts a layer): 2: " in err
    # no single-size validation pick of its best (nearly the full model): the picks are per size
    assert "picking the export" not in err
    summary = json.loads((run / "summary.json").read_text())
    assert summary["selected"]["by"] == "search fitness"
    assert all(p["validation"] is not None for p in summary["picks"].values())
    pick = summary["picks"]["4"]
    search = json.loads((run / "baselines.json").read_text())["methods"]["search"]
    assert search["heldout"] == pick["heldout"]["mean"]
    assert search["genome_key"] == Genome.from_dict(pick["genome"]).key
    assert search["how"] == f"the frontier's pick at 4 of 8, candidate {pick['id']}"
    assert (
        search["kept_params"]
        < json.loads((run / "baselines.json").read_text())["methods"]["full"]["kept_params"]
    )
    text = write_report(run).read_text()
    assert f"the search row is the frontier's pick at that size (candidate {pick['id']}," in text
    assert "- exported:" not in text and "generalisation gap" not in text
    held = {k: summary["picks"][k]["heldout"]["mean"] for k in ("2", "4")}
    assert f"| search | {held['2']:.1f} | {held['4']:.1f} |" in text  # its picks in the sweep too
    assert "Behind a baseline held out: " in text or (
        "At every size the baselines were scored at (2, 4 experts a layer)" in text
    )
    with pytest.raises(EepError, match="holds a frontier: choose the point to export"):
        Run(run).export(tmp_path / "out", log=lambda m: None)
    with pytest.raises(
        EepError, match="--point, --max-params and --max-latency each choose the point"
    ):
        Run(run).export(tmp_path / "out", log=None, point=1, max_params=10**6)


def latency_config(**search):
    data = frontier_config(**search)
    data["search"]["objectives"] = ["fitness", "latency"]
    return data


def test_latency_operators_keep_each_layers_top_k_within_what_it_keeps():
    from deap import base

    from eep.loop import active_experts
    from search_spaces import LatencyFrontierSpace

    space = LatencyFrontierSpace(8, 2, (0, 1, 2, 3))
    cfg = parse_config(latency_config()).search
    toolbox = base.Toolbox()
    space.register(toolbox, cfg, random.Random(0))
    genomes = [toolbox.individual() for _ in range(60)]
    assert {active_experts(g) for g in genomes} >= {4, 8}  # the top-k axis is covered
    assert min(map(kept_experts, genomes)) <= 12 and max(map(kept_experts, genomes)) >= 26
    pairs = {(len(g.keep(i)), g.active(i)) for g in genomes for i in range(4)}
    assert (1, 1) in pairs and (8, 1) in pairs and (8, 2) in pairs
    for a, b in zip(genomes, genomes[1:]):
        for child in (toolbox.mutate(a), toolbox.mate(a, b)):
            assert space.reject(child) is None  # Genome itself refuses top-k above what is kept
        assert toolbox.mutate(a) != a
    # both axes move under mutation
    mutants = [toolbox.mutate(genomes[0]) for _ in range(80)]
    assert {kept_experts(m) - kept_experts(genomes[0]) for m in mutants} >= {-1, 0, 1}
    assert len({active_experts(m) for m in mutants}) >= 2
    again = base.Toolbox()
    space.register(again, cfg, random.Random(0))
    assert [again.individual() for _ in range(60)] == genomes  # deterministic
    assert "above top_k=2" in space.reject(
        Genome.from_keep(8, 3, {i: range(8) for i in range(4)}, 3)
    )


def _timed(self, genome, skip=None):
    """A stand-in for a measured latency (a share of the full model's time) that depends on the
    genome alone (1/48 a kept expert, 2/48 a routed one), so that two runs see the same times."""
    from eep.loop import active_experts

    if genome is None:
        return 1.0
    return (kept_experts(genome) + 2 * active_experts(genome)) / 48


def test_a_latency_frontier_is_deterministic_given_its_times_and_resumes_exactly(
    tmp_path, monkeypatch
):
    """With times that depend on the genome alone, two runs are equal and a stopped run resumed
    (from its snapshot, or replayed from its journal) equals them: each record holds its latency.
    No candidate is cut (a latency is unknown until measured)."""
    monkeypatch.setattr(FitnessWorker, "latency", _timed)
    config, schedule = _planned(latency_config())
    worker = FitnessWorker(config)  # measures latency: its config asks for it
    assert type(schedule.first).__name__ == "LatencyFrontierSpace"
    assert config.search.smallest_from is None  # no uniform smallest size to turn to

    def search(path, stop_after=None):
        run = (
            RunDir.create(path, config)
            if not (path / "config.yaml").exists()
            else RunDir.open(path)
        )
        run_search(run, schedule, SerialEvaluator(worker), lambda m: None, stop_after)
        return run

    whole = search(tmp_path / "whole")
    records = whole.evaluations()
    assert all(r.latency == _timed(None, r.genome) for r in records)
    assert all(r.cut is None for r in records)
    assert _journal(search(tmp_path / "again")) == _journal(whole)
    search(tmp_path / "cut", stop_after=12)
    assert _journal(search(tmp_path / "cut")) == _journal(whole)
    search(tmp_path / "replayed", stop_after=12)
    (tmp_path / "replayed" / "state.json").unlink()
    assert _journal(search(tmp_path / "replayed")) == _journal(whole)
    from eep.loop import front_of, latency

    front = front_of(records, latency)
    assert [e.latency for e in front] == sorted(e.latency for e in front)
    assert [e.fitness for e in front] == sorted(e.fitness for e in front)
    for e in front:  # no record dominates a front point
        assert not any(
            o.latency <= e.latency
            and o.fitness >= e.fitness
            and (o.latency, o.fitness) != (e.latency, e.fitness)
            for o in records
        )


def test_the_plan_of_a_latency_frontier_says_how_it_times_and_exports(capsys):
    from pathlib import Path

    from eep.cli import main

    path = Path(__file__).resolve().parents[1] / "experiments/toy-latency.yaml"
    assert main(["search", str(path), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "latency frontier: each of 4 layers keeping 1..8 experts and routing to 1..2" in out
    assert "no early cut (a candidate's latency is unknown until it is measured)" in out
    assert "the fastest of 5 forward passes of 32 search prompts" in out
    assert "--max-latency MS" in out and "--serial times alone" not in out
    assert main(["search", str(path), "--dry-run", "--set", "evaluator.kind=ray"]) == 0
    assert "CPU actors on one machine time their candidates" in capsys.readouterr().out


def test_a_latency_frontier_measures_each_candidate_and_exports_within_a_time(tmp_path, capsys):
    """Measured for real on the worker: every record has a latency, the front is over them with
    the full model's as the reference, the report lists the points, and --max-latency exports the
    best by search fitness within a time (--max-params is refused on such a run)."""
    import eep
    from eep.cli import main
    from eep.report import write_report

    data = latency_config(evaluations=20, initial=8, latency_repeats=2)
    data["baselines"] = {"methods": ["frequency"], "sweep": [2]}
    run = eep.search(data, run_dir=tmp_path / "run", log=lambda m: None)
    summary = run.summary
    assert all(r.latency > 0 for r in run.evaluations())
    front = summary["front"]
    assert summary["objective"] == "latency"
    # a pick within each front point's time (no validation examples here: the best by search
    # fitness, the slower among equals)
    picks = summary["picks"]
    # shares of the full model's time: within each front point's, every 5 % above them, the full
    # model's
    steps = {k / 20 for k in range(1, 20) if front[-1]["latency"] < k / 20}
    shares = sorted({p["latency"] for p in front} | steps | {1.0})
    assert [p["within"] for p in picks.values()] == shares
    # drawn on the front re-timed at the end (every point of it), the journal as measured
    again = {int(i): share for i, share in summary["latency_retimed"].items()}
    assert {p["id"] for p in front} <= set(again)
    records = [replace(r, latency=again.get(r.id, r.latency)) for r in run.evaluations()]
    for pick in picks.values():
        within = [r for r in records if r.ok and r.latency <= pick["within"]]
        assert pick["latency"] <= pick["within"]
        assert pick["fitness"] == max(r.fitness for r in within)
    assert [p["latency"] for p in front] == sorted(p["latency"] for p in front)
    assert [p["fitness"] for p in front] == sorted(p["fitness"] for p in front)
    full_ms = summary["full_latency"]  # shown in milliseconds of the full model's time
    assert all(p["latency_ms"] == p["latency"] * full_ms for p in front)
    noise = summary["latency_noise"]  # the full model against itself: about 1
    assert len(noise) == 5 and all(0.5 < share < 2 for share in noise)
    assert summary["hypervolume"] == hypervolume(
        [(p["heldout"]["mean"], p["latency"]) for p in front], 1.0
    )
    ms = [p["latency_ms"] for p in front]
    limit = (ms[-1] + ms[-2]) / 2 if len(front) > 1 else 99.0
    chosen = run.front_point(max_latency=limit)
    assert chosen == max(
        (p for p in picks.values() if round(p["within_ms"], 3) <= limit), key=lambda p: p["within"]
    )
    with pytest.raises(
        EepError, match="frontier is over latency: choose a point with --max-latency"
    ):
        run.front_point(max_params=10**6)
    with pytest.raises(
        EepError, match="no frontier point has at most 0.000 ms latency; the fastest takes"
    ):
        run.front_point(max_latency=0.0)
    out = tmp_path / "x"
    capsys.readouterr()
    assert (
        main(["export", str(tmp_path / "run"), "--max-latency", str(limit), "--out", str(out)]) == 0
    )
    assert f"[eep] the pick within {chosen['within_ms']:.3f} ms, candidate {chosen['id']}:" in (
        capsys.readouterr().err
    )
    # a time copied from the report (to the thousandth) takes that row's pick, even where the
    # measured time lies a little above what is shown
    shown = float(f"{ms[-1]:.3f}")
    assert run.front_point(max_latency=shown)["within"] == front[-1]["latency"]
    assert run.front_point(max_latency=shown - 0.0004)["within"] == front[-1]["latency"]
    with pytest.raises(SystemExit):  # argparse: "is not a positive number of milliseconds"
        main(["export", str(tmp_path / "run"), "--max-latency", "-1", "--out", str(out)])
    assert "is not a positive number of milliseconds" in capsys.readouterr().err
    exported = json.loads((out / "eep_report.json").read_text())
    genome = Genome.from_dict(chosen["genome"])
    assert exported["genome_key"] == genome.key
    assert exported["latency"] == {"share": chosen["latency"], "ms": chosen["latency_ms"]}
    assert "- latency measured by the search: " in (out / "README.md").read_text()
    # layers keeping different numbers and routing to different top-k: the custom form, which
    # computes what the search scored
    from eep.model import load_model
    from eep.moe import adapter_for

    model, tokenizer = load_model(run.config.model)
    small, _ = load_model(run.config.model.model_copy(update={"path": str(out)}))
    ids = tokenizer(
        ["reverse : a b c d =", "lookup : p o n m ="], return_tensors="pt", padding=True
    )
    with torch.no_grad(), adapter_for(model).applied(genome):
        torch.testing.assert_close(small(**ids).logits, model(**ids).logits, atol=1e-5, rtol=0)
    text = write_report(tmp_path / "run").read_text()
    assert "| candidate | experts kept / top-k (per layer) | measured ms a forward pass |" in text
    assert "`--max-latency MS`" in text and "Compressed methods keep" not in text
    assert (
        f"Timed against itself 5 times at the end, the full model took {100 * min(noise):.1f}"
        in text
    )
    assert "Every baseline point" not in text and "Not dominated" not in text  # none yet
    assert f"| {summary['full_latency']:.3f} ms (the full model's) |" in text  # rows say what
    assert f"| {ms[-1]:.3f} ms (a front point's) |" in text
    # the baselines beside it are timed as its candidates were, and placed on its plot by that
    import yaml

    (tmp_path / "latency.yaml").write_text(yaml.safe_dump(data))
    capsys.readouterr()
    assert (
        main(["baselines", str(tmp_path / "latency.yaml"), "--run-dir", str(tmp_path / "run")]) == 0
    )
    table = json.loads((tmp_path / "run" / "baselines.json").read_text())
    frequency = table["methods"]["frequency"]
    out = capsys.readouterr().out
    assert f"active {frequency['active_params']:,}  {100 * frequency['latency']:.1f} % time" in out
    swept = table["sweep_rows"]["2"]["frequency"]  # the sweep's sizes, timed too
    assert (
        f"at 2 of 8: frequency {swept['heldout']:.2f} ({100 * swept['latency']:.1f} % time)" in out
    )
    assert "search" not in table["methods"]  # a latency front has no pick at a uniform size
    rows = [table["methods"]["frequency"], table["sweep_rows"]["2"]["frequency"]]
    assert all(row["latency"] > 0 for row in rows + [table["methods"]["full"]])
    text = write_report(tmp_path / "run").read_text()
    assert "Best compressed method" not in text  # the front meets the baselines by time
    assert "sets each baseline beside the front by its measured time" in text
    assert "Every baseline point is dominated held out" in text or (
        "Not dominated held out by a front point or a pick: frequency " in text
    )


def test_a_latency_front_is_re_timed_until_every_point_of_it_was():
    """A point measured at a lucky moment loses its place once re-timed (the median of its
    shares), and the point it hid is re-timed in turn."""
    from eep.evolution import RETIMES, retimed
    from eep.loop import front_of, latency

    def genome(n):
        return Genome.from_keep(8, 2, {0: range(n)})

    true = {2: 0.4, 5: 0.8, 6: 0.6}  # by experts kept: what the evaluator measures now

    class Timer:
        calls: list = []

        def latency(self, g):
            self.calls.append(len(g.keep(0)))
            return true[len(g.keep(0))]

    archive = [
        Evaluation(0, genome(2), 50.0, latency=0.4),
        Evaluation(1, genome(5), 90.0, latency=0.5),  # lucky: it takes 0.8
        Evaluation(2, genome(6), 90.0, latency=0.6),
    ]
    assert [e.id for e in front_of(archive, latency)] == [0, 1]
    timer = Timer()
    again, shares = retimed(archive, timer, lambda m: None)
    assert [e.id for e in front_of(again, latency)] == [0, 2] and shares == {0: 0.4, 1: 0.8, 2: 0.6}
    assert [e.latency for e in again] == [0.4, 0.8, 0.6]
    assert sorted(timer.calls) == sorted([2, 5, 6] * RETIMES)
    assert [e.latency for e in archive] == [0.4, 0.5, 0.6]  # the records as journaled


def test_calibration_warm_starts_seed_a_frontier_at_the_upper_sizes(tmp_path, worker):
    """``warm_start: [naee, frequency]`` on a frontier: their keep sets at ceil(E/2)..E-1 experts
    per layer, from one calibration pass, are its first candidates, stored in the run as seed
    genomes (so it resumes exactly); the plan says so and counts them out of ``initial``."""
    from eep.evolution import METHOD, create_run, resolve, warm_keeps

    config = parse_config(
        frontier_config(warm_start=["naee", "frequency"], evaluations=24, initial=20)
    )
    schedule = METHOD.plan(config, worker.adapter.shape)
    assert warm_keeps(config.search, schedule) == [4, 5, 6, 7]
    lines = dict(METHOD.plan_lines(config, schedule))
    assert lines["warm start"].startswith("naee, frequency at 4..7 of 8 experts per layer")
    assert "(12 random initial)" in lines["budget"]
    run, stored = create_run(
        resolve(config, schedule), tmp_path / "run", schedule, SerialEvaluator(worker), print
    )
    names = stored.search.seed_genomes
    assert stored.search.warm_start == [] and 4 <= len(names) <= 8
    sizes = [int(n.removesuffix(".json").split("-")[-1]) for n in names]
    assert set(sizes) == {4, 5, 6, 7}
    for name, keep in zip(names, sizes):  # every layer keeps the size its name says
        assert name.startswith("seeds/warm-")
        assert kept_experts(Genome.load(run.path / name)) == 4 * keep
    run_search(run, schedule, SerialEvaluator(worker), log=lambda m: None, stop_after=10)
    first = [e.genome.key for e in run.evaluations()[: len(names)]]
    assert first == [Genome.load(run.path / n).key for n in names]
    # stopped after the seeds, then resumed from the run alone: the uninterrupted run's records
    resumed = run_search(RunDir.open(run.path), schedule, SerialEvaluator(worker), lambda m: None)
    whole, _ = create_run(
        resolve(config, schedule), tmp_path / "whole", schedule, SerialEvaluator(worker), print
    )
    assert run_search(whole, schedule, SerialEvaluator(worker), lambda m: None) == resumed
    assert _journal(RunDir.open(run.path)) == _journal(whole)
    # thinned to fill at most half of search.initial: 6 // (2 * 3) = 1 size
    small = parse_config(frontier_config(warm_start=["naee", "reap", "frequency"], initial=6))
    assert warm_keeps(small.search, METHOD.plan(small, worker.adapter.shape)) == [4]
