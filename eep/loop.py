"""The search: EEP's steady-state evolution over an archive of evaluated genomes.

There are no generations. Candidate ``i`` is the i-th of ``seed_genomes`` (genome files copied into
the run directory) while there is one, then a random genome while ``i < initial``; after that it
is bred from the archive: with probability ``crossover_prob`` two parents among those within
``crossover_threshold`` points of the best are crossed, otherwise one parent within
``mutate_threshold`` points is taken; the child is then always mutated. A child whose content
hash was already proposed is bred again, so no genome is evaluated twice.

With ``search.warm_start: [greedy]`` (or ``auto`` where it resolves to that, :func:`eep.greedy.starts`)
the first candidates are greedy elimination's (:mod:`eep.greedy`), journaled like the rest; seeds
and random genomes follow. Each candidate carries the fitness it
must reach to matter (:func:`parent_bar`; on a frontier :func:`front_bar`; for greedy's options
:func:`_greedy_bar`) so that a worker may cut a hopeless one short, and the order of examples that
makes such a cut come soonest (:func:`example_order`).

The operators come from the search space of the candidate's phase (:class:`search_spaces.Schedule`):
EEP prunes first, then from ``merge_after`` on breeds merge genomes from the same archive, so
the first merge children are perturbed copies of the best pruned genomes. A multi-objective search
breeds from NSGA-II's parent pool (:func:`breed_front`), and from ``search.smallest_after`` on at
its smallest size only, as a single-size search does, from the candidates of that size.

Every evaluation is appended to the journal before it is folded into the archive, and the
RNG state is snapshotted after every breeding step, so `eep resume` continues exactly where a
stopped search was (see :mod:`eep.journal`). Without a usable snapshot (missing, corrupt, failed
checksum) the journal alone suffices: the search is replayed from its seed, the journal's
records standing in for the evaluations (each replayed genome is checked against the record),
which rebuilds the same state, and the search goes on from there.
"""

from __future__ import annotations

import heapq
import itertools
import random
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import replace

import numpy as np
from deap import base

from eep import greedy
from eep.config import SearchConfig, differences
from eep.errors import EepError
from eep.evaluator import Candidate
from eep.genome import Genome
from eep.journal import Evaluation, RunDir, warm_seed_name
from search_spaces import Schedule


def make_toolbox(space, cfg: SearchConfig, rng: random.Random) -> base.Toolbox:
    """A DEAP toolbox with the space's ``individual`` (if it has one), ``mutate`` and ``mate``."""
    toolbox = base.Toolbox()
    space.register(toolbox, cfg, rng)
    return toolbox


def breed(
    toolbox: base.Toolbox, archive: list[Evaluation], cfg: SearchConfig, rng: random.Random
) -> Genome:
    """One child from the archive (EEP's parent pools; no generation barrier)."""
    ranked = sorted((e for e in archive if e.candidate), key=lambda e: (-e.fitness, e.id))
    if not ranked:
        return toolbox.individual()
    best = ranked[0].fitness
    within = [e for e in ranked if e.fitness >= best - cfg.crossover_threshold]
    mates = ranked[: max(len(within), cfg.crossover_pool_min)]
    if len(mates) >= 2 and rng.random() < cfg.crossover_prob:
        a, b = rng.sample(mates, 2)
        child = toolbox.mate(a.genome, b.genome)
    else:
        child = rng.choice([e for e in ranked if e.fitness >= best - cfg.mutate_threshold]).genome
    return toolbox.mutate(child)


def random_initial(search: SearchConfig, warm: int, seeds: int) -> int:
    """Random genomes drawn before breeding (:meth:`_Proposals._child`): they fill
    ``search.initial`` after the greedy warm start's ``warm`` candidates and ``seeds`` seed genomes,
    so a greedy start of ``initial`` or more leaves none."""
    return max(0, search.initial - warm - seeds)


def kept_experts(genome: Genome) -> int:
    """Experts a genome keeps in all layers: the ``kept_params`` objective of a multi-objective
    search (the experts of one model are the same size, so kept parameters are an affine function
    of it)."""
    return sum(gene.slots for _, gene in genome.layers)


def active_experts(genome: Genome) -> int:
    """Experts a token is routed to in all layers: the ``active_params`` objective (with every
    expert kept, active parameters are an affine function of it)."""
    return sum(genome.active(i) for i, _ in genome.layers)


def kept(e: Evaluation) -> int:
    """:func:`kept_experts` of an evaluation's genome."""
    return kept_experts(e.genome)


def active(e: Evaluation) -> int:
    """:func:`active_experts` of an evaluation's genome."""
    return active_experts(e.genome)


def latency(e: Evaluation) -> float:
    """An evaluation's measured latency (``Evaluation.latency``, milliseconds): the ``latency``
    objective, the one known only once the candidate is evaluated."""
    return e.latency


SIZES = {"kept_params": kept, "active_params": active, "latency": latency}
"""A multi-objective search's size objectives: what the loop compares of two evaluations."""

COUNTED = {"kept_params": kept_experts, "active_params": active_experts}
"""The size objectives known from the genome alone, before it is evaluated."""


def fronts(
    archive: list[Evaluation], needed: int | None = None, size=kept
) -> list[list[Evaluation]]:
    """The candidates of ``archive`` in non-dominated fronts, best first, by (fitness up, ``size``
    down), until ``needed`` are placed (None: all), as DEAP's ``sortNondominated`` sorts
    them (identical points share a front). Two objectives make each front one sweep over the
    candidates by size: a candidate is in it when it beats the fitness of every smaller or equal
    one left, or equals the point just taken."""
    rest = sorted(
        (e for e in archive if e.candidate),
        key=lambda e: (size(e), -e.fitness, e.id),
    )
    out: list[list[Evaluation]] = []
    while rest and (needed is None or sum(map(len, out)) < needed):
        front, left, best = [], [], float("-inf")
        for e in rest:
            same = front and (e.fitness, size(e)) == (front[-1].fitness, size(front[-1]))
            (front if e.fitness > best or same else left).append(e)
            best = max(best, e.fitness)
        out.append(front)
        rest = left
    return out


def front_of(archive: list[Evaluation], size=kept) -> list[Evaluation]:
    """The non-dominated candidates (smallest first), one per point (the first evaluated of
    identical ones): the accuracy-size frontier found so far."""
    found = fronts(archive, 1, size)
    points: dict[tuple, Evaluation] = {}
    for e in found[0] if found else []:
        points.setdefault((e.fitness, size(e)), e)
    return list(points.values())


class _Objectives(base.Fitness):
    weights = (1.0, -1.0)  # fitness up, size down


class _Point(list):
    """A candidate as DEAP's selection sees it: a ``fitness`` with the objective values."""


def nsga2_pool(
    archive: list[Evaluation], pool: int, size=kept
) -> list[tuple[Evaluation, int, float]]:
    """The parents of a multi-objective search: DEAP's NSGA-II selection (``tools.selNSGA2``:
    whole fronts in rank order, the last one cut by crowding distance) of ``size`` candidates,
    made on the first fronts of the archive (which decide it) so that it costs little however
    long the search; each with its front rank and crowding distance. ``size``: the size objective."""
    from deap import tools

    individuals = []
    for rank, front in enumerate(fronts(archive, pool, size)):
        for e in front:
            individual = _Point()
            individual.fitness = _Objectives((e.fitness, size(e)))
            individual.evaluation, individual.rank = e, rank
            individuals.append(individual)
    # in archive order, as on the whole archive: DEAP breaks crowding ties by position
    individuals.sort(key=lambda i: i.evaluation.id)
    chosen = tools.selNSGA2(individuals, min(pool, len(individuals)))
    return [(i.evaluation, i.rank, i.fitness.crowding_dist) for i in chosen]


def breed_front(
    toolbox: base.Toolbox, archive: list[Evaluation], cfg: SearchConfig, rng: random.Random
) -> Genome:
    """One child of a multi-objective search: parents from the NSGA-II pool by binary tournament
    (lower front rank, then larger crowding distance, then the earlier id), crossed with
    ``crossover_prob``; the child is always mutated. Judged on the archive alone, as :func:`breed`."""
    pool = sorted(
        nsga2_pool(archive, cfg.population, SIZES[cfg.objectives[1]]), key=lambda p: p[0].id
    )
    if not pool:
        return toolbox.individual()

    def tournament() -> Genome:
        a, b = rng.sample(pool, 2) if len(pool) > 1 else (pool[0], pool[0])
        return min(a, b, key=lambda p: (p[1], -p[2], p[0].id))[0].genome

    if len(pool) > 1 and rng.random() < cfg.crossover_prob:
        return toolbox.mutate(toolbox.mate(tournament(), tournament()))
    return toolbox.mutate(tournament())


def parent_bar(archive: list[Evaluation], cfg: SearchConfig, export_top: int = 1) -> float | None:
    """The fitness a new candidate must reach to ever matter to this search, judged on ``archive``
    (the results it was bred from); None when any fitness could matter.

    A candidate below the bar is outside every parent pool of :func:`breed` for good: the best only
    rises, so it stays more than both thresholds below the best, and the ``crossover_pool_min``
    genomes already at or above the bar keep it out of the top that the crossover pool falls back
    to. Nor is it ever the best, nor among the ``export_top`` best the export is picked from
    (``search.select_top`` where tasks have validation examples). So whether it is scored to the
    end changes nothing the search does or exports.
    """
    pool = max(cfg.crossover_pool_min, export_top, 1)
    ranked = sorted((e.fitness for e in archive if e.candidate), reverse=True)
    if len(ranked) < pool:
        return None
    return min(ranked[0] - max(cfg.crossover_threshold, cfg.mutate_threshold), ranked[pool - 1])


def front_bar(archive: list[Evaluation], size: int, needed: int, size_of=kept) -> float | None:
    """The fitness a new candidate of a multi-objective search, of ``size`` (``size_of`` its
    evaluation, known before it: counted on the genome), must reach to ever matter, judged on
    ``archive``; None when any fitness could matter.

    It is the ``needed``-th best fitness among the candidates no larger. Below it, that many
    candidates dominate the new one for good (they score higher at no larger size, and stay in the
    archive), so each lies on an earlier front than it: :func:`nsga2_pool`, which takes whole
    fronts in order until it holds ``population``, never reaches it; it is on no front; and at every
    size it fits, it is outside the ``select_top`` best a pick is made among (:func:`eep.evolution`'s
    ``_pick``). ``needed``: the larger of ``population`` and the candidates the picks judge."""
    ranked = sorted(
        (e.fitness for e in archive if e.candidate and size_of(e) <= size), reverse=True
    )
    return ranked[needed - 1] if len(ranked) >= needed else None


def export_top(config) -> int:
    """How many of the best by search fitness the export is picked among (``search.select_top``
    when tasks have validation examples, else the best alone): what :func:`parent_bar` spares."""
    return config.search.select_top if config.fitness.validates else 1


def _nearest(records: list[Evaluation], genome: Genome, n: int) -> list[Evaluation]:
    """The ``n`` records sharing most kept experts with ``genome`` (ties: the earlier)."""
    mine = genome.kept_bits
    return heapq.nsmallest(
        n, records, key=lambda e: (-(mine & e.genome.kept_bits).bit_count(), e.id)
    )


# a record's example verdicts ("1", "0", ".") read as misses: 0, 1, unknown
_MISSED = np.full(256, np.nan)
_MISSED[ord("0")], _MISSED[ord("1")] = 1.0, 0.0


def example_order(
    archive: list[Evaluation],
    genome: Genome,
    tasks: list[str],
    neighbours: int = 64,
    ridge: float = 1.0,
) -> tuple:
    """``genome``'s generation examples, the likeliest misses first. Each example's miss is
    predicted by a kernel ridge regression over the ``neighbours`` evaluated genomes sharing most
    kept experts with it, the kernel being the number of kept (layer, expert) pairs two genomes
    share, plus one: the closest relatives weigh most, and an expert that causes misses wherever it
    is dropped is learnt from all of them. An example a cut relative did not score counts as the
    mean of the relatives that did; ties go in task order. A hopeless candidate then shows it on its
    first chunks, so the early cut stops it sooner (toy, 200 evaluations at 2 of 8: 35 % of a
    search's examples spared, against 29 % counting the misses of the 8 nearest and 24 % ordering
    whole tasks). ``(task, index)`` pairs; by tasks (:func:`task_order`) for records that keep no
    examples (journals of older versions). Any order gives the same scores; this one only decides
    how soon a cut comes. Judged on the results the candidate was bred from, like
    :func:`parent_bar`."""
    known = [e for e in archive if e.examples and (e.ok or e.cut is not None)]
    if not known:
        return task_order(archive, genome, tasks)
    near = _nearest(known, genome, neighbours)
    counts = {t: max(len(e.examples.get(t, "")) for e in near) for t in tasks}
    keys = [(t, i) for t in tasks for i in range(counts[t])]
    # per relative and example: 1 missed, 0 scored in full, nan not scored
    text = ["".join(e.examples.get(t, "").ljust(counts[t], ".") for t in tasks) for e in near]
    missed = _MISSED[np.frombuffer("".join(text).encode(), np.uint8)].reshape(len(near), len(keys))
    scored = ~np.isnan(missed)
    mean = np.where(scored.any(0), np.nansum(missed, 0) / np.maximum(scored.sum(0), 1), 0.5)
    missed = np.where(scored, missed, mean)
    bits = [e.genome.kept_bits for e in near]
    kernel = np.array([[(a & b).bit_count() + 1.0 for b in bits] for a in bits])
    weights = np.array([(genome.kept_bits & b).bit_count() + 1.0 for b in bits])
    predicted = weights @ np.linalg.solve(kernel + ridge * np.eye(len(near)), missed)
    rank = sorted(range(len(keys)), key=lambda k: (-round(float(predicted[k]), 9), k))
    return tuple(keys[k] for k in rank)


def task_order(
    archive: list[Evaluation], genome: Genome, tasks: list[str], neighbours: int = 3
) -> tuple[str, ...]:
    """``tasks``, worst first as scored by the ``neighbours`` evaluated genomes sharing most kept
    experts with ``genome``: where a hopeless candidate most likely misses, so that the early cut
    can stop it sooner. Any order gives the same scores; this one only decides how soon a cut comes.
    Judged on the results the candidate was bred from, like :func:`parent_bar`."""
    ok = [e for e in archive if e.ok and all(t in e.scores for t in tasks)]
    if not ok or len(tasks) < 2:
        return ()
    near = _nearest(ok, genome, neighbours)
    return tuple(sorted(tasks, key=lambda t: (sum(e.scores[t] for e in near), tasks.index(t))))


def run_search(
    run: RunDir,
    space,
    evaluator,
    log: Callable[[str], None] = print,
    stop_after: int | None = None,
    stats: dict | None = None,
) -> dict:
    """Run (or resume) the search recorded in ``run`` until its budget is spent.

    ``space`` is a search space or a :class:`search_spaces.Schedule` of them.
    ``stop_after`` ends this call after that many new evaluations (the search stays resumable).
    ``stats``, when given, receives ``rebred``: children of this call that were already evaluated
    or in flight and were bred again instead (never re-evaluated).
    Returns the summary also written to ``summary.json``.
    """
    cfg = run.config().search
    schedule = Schedule.of(space)
    archive = run.evaluations()
    progress = _Progress(cfg.evaluations, log)
    warm = (
        _greedy_phase(run, schedule.first, evaluator, archive, log, progress)
        if greedy.starts(cfg, schedule.first)
        else []
    )
    # candidates 0..len(warm)-1 are the greedy warm start's
    archive = warm + [e for e in archive if e.id >= len(warm)]
    proposals = _Proposals(run, schedule, archive, len(warm), log)
    replay = proposals.replay  # journal records re-bred from the seed when the snapshot is unusable
    new, failing = 0, 0
    if len(archive) + len(replay) < cfg.evaluations:
        source = _Replay(replay, evaluator, cfg.in_flight) if replay else evaluator
        for evaluation in source.imap(proposals):
            proposals.landed(evaluation)
            replayed = evaluation.id < proposals.start + len(replay)
            if not replayed:
                run.append(evaluation)  # on disk before it counts
            archive.append(evaluation)
            if replayed:
                continue
            run.write_summary(summarise(archive))
            progress.update(
                archive, evaluation, evaluator.busy_fraction(), proposals.phase_note(evaluation)
            )
            new += 1
            failing = failing + 1 if evaluation.failed else 0
            if failing >= cfg.max_failures:
                raise EepError(
                    f"{failing} evaluations in a row failed (the last: {evaluation.error}); every one "
                    f"is in the journal; fix the cause and continue with `eep resume {run.path}`"
                )
            if stop_after is not None and new >= stop_after:
                break
    if stats is not None:
        stats["rebred"] = proposals.rebred
    return summarise(archive + replay[len(archive) - proposals.start :])


class _Proposals:
    """The candidates of a search, in order, bred from ``archive`` (which the loop extends as
    results land), with the breeding state that makes them reproducible: the next id, the RNG,
    the candidates in flight and every proposed genome's key. The state is restored from the
    run's snapshot, or rebuilt by replaying the journal from the seed when the snapshot is
    missing or unusable (:attr:`replay`: the records to replay), and saved after every child."""

    def __init__(self, run: RunDir, schedule: Schedule, archive: list[Evaluation], start: int, log):
        config = run.config()
        self.run, self.cfg, self.schedule, self.archive, self.log = (
            run,
            config.search,
            schedule,
            archive,
            log,
        )
        self.outcome, self.digest = config.outcome(), config.digest()  # computed once
        self.tasks = [t.name for t in config.fitness.tasks]
        self.export_top = export_top(config)
        self.start = start
        self.rng = random.Random(self.cfg.seed)
        self.toolboxes = [make_toolbox(s, self.cfg, self.rng) for _, s in schedule.phases]
        self.seeds = [Genome.load(run.path / path) for path in self.cfg.seed_genomes]
        # a frontier's last phase, at its smallest size (search.smallest_after): its candidates
        self.smallest = (
            schedule.phases[-1] if self.cfg.frontier and len(schedule.phases) > 1 else None
        )
        self._smallest, self._scanned = [], 0
        self.replay: list[Evaluation] = []
        self.next_id, self.in_flight = start, deque()
        self.rebred = 0
        self._restore()
        self.seen = {e.genome.key for e in archive} | {c.genome.key for c in self.in_flight}

    def _restore(self) -> None:
        try:
            state = self.run.load_state()
        except EepError as err:
            self.log(f"[eep] warning: {err}")
            state = None
        archive, start = self.archive, self.start
        if state is None:
            if len(archive) > start:
                self.log(
                    f"[eep] rebuilding the search state by replaying the {len(archive) - start} "
                    "journal records"
                )
            self.replay = archive[start:]
            del archive[start:]
            return
        # a larger budget continues the same search: candidate i never depends on the budget
        extended = "config" in state and _without_budget(state["config"]) == _without_budget(
            self.outcome
        )
        if state["config_digest"] != self.digest and not extended:
            what = f" ({differences(state['config'], self.outcome)})" if "config" in state else ""
            raise EepError(
                f"{self.run.path}/config.yaml changed since the search started{what}; restore it to "
                "resume"
            )
        self.rng.setstate(_rng_state_from_json(state["rng"]))
        self.next_id = state["next_id"]
        done = {e.id for e in archive}
        self.in_flight = deque(
            Candidate(
                c["id"],
                Genome.from_dict(c["genome"]),
                c.get("bar"),
                tuple(o if isinstance(o, str) else tuple(o) for o in c.get("order", ())),
            )
            for c in state["in_flight"]
            if c["id"] not in done
        )

    def __iter__(self) -> Iterator[Candidate]:
        yield from list(self.in_flight)  # bred before a stop, never finished: evaluate them first
        cut = self.cfg.early_cut
        while self.next_id < self.cfg.evaluations:
            genome = self._child()
            if genome is None:
                return
            candidate = Candidate(
                self.next_id,
                genome,
                self._bar(genome) if cut else None,
                example_order(self.archive, genome, self.tasks) if cut else (),
            )
            self.next_id += 1
            self.seen.add(genome.key)
            self.in_flight.append(candidate)
            self._save()
            yield candidate

    def _at_smallest(self) -> list[Evaluation]:
        """The archive's candidates of the smallest size (:attr:`smallest`'s space): the parents
        of the frontier's last phase, kept up to date as results land."""
        space = self.smallest[1]
        for e in self.archive[self._scanned :]:
            if e.candidate and space.reject(e.genome) is None:
                self._smallest.append(e)
        self._scanned = len(self.archive)
        return self._smallest

    def _at_smallest_phase(self, candidate_id: int) -> bool:
        """Whether candidate ``candidate_id`` is bred in a frontier's smallest-size phase."""
        return self.smallest is not None and candidate_id >= self.smallest[0]

    def phase_note(self, evaluation: Evaluation) -> str:
        """What a progress line adds about ``evaluation``'s phase: in a frontier's smallest-size
        phase, the best fitness at that size (the line's best is the whole front's)."""
        if not self._at_smallest_phase(evaluation.id):
            return ""
        best = max((e.fitness for e in self._at_smallest()), default=None)
        return "smallest size" + (f", best there {best:.2f}" if best is not None else "")

    def _bar(self, genome: Genome) -> float | None:
        """The fitness below which candidate ``next_id``, ``genome``, may be cut short
        (:func:`parent_bar`, :func:`front_bar`). In a frontier's smallest-size phase it is a
        single-size search's bar among the candidates of that size (what follows breeds from them
        alone). Before that phase, a candidate of that size gets the lower of the front's bar and
        the phase's bar as it stands: that bar only rises, so what lies below it now never becomes a
        parent there. A latency frontier has none: a candidate's latency is measured with it, so
        any fitness could put it on the front."""
        cfg = self.cfg
        if not cfg.frontier:
            return parent_bar(self.archive, cfg, self.export_top)
        if self._at_smallest_phase(self.next_id):
            return parent_bar(self._at_smallest(), cfg, self.export_top)
        objective = cfg.objectives[1]
        if objective == "latency":
            return None
        mine = COUNTED[objective](genome)
        bar = front_bar(self.archive, mine, max(cfg.population, self.export_top), SIZES[objective])
        if bar is not None and self.smallest and self.smallest[1].reject(genome) is None:
            later = parent_bar(self._at_smallest(), cfg, self.export_top)
            bar = None if later is None else min(bar, later)
        return bar

    def _child(self) -> Genome | None:
        """Candidate ``next_id``'s genome: a seed, a random one, or bred; never one already seen."""
        cfg, i = self.cfg, self.next_id
        toolbox = self.toolboxes[self.schedule.phase(i)]
        for _ in range(cfg.max_breed_attempts):
            seed = i - self.start  # seeds follow the greedy warm start
            if seed < len(self.seeds) and self.seeds[seed].key not in self.seen:
                genome = self.seeds[seed]
            elif i < cfg.initial:
                genome = toolbox.individual()
            elif not cfg.frontier:
                genome = breed(toolbox, self.archive, cfg, self.rng)
            elif self._at_smallest_phase(i):
                genome = breed(toolbox, self._at_smallest(), cfg, self.rng)
            else:
                genome = breed_front(toolbox, self.archive, cfg, self.rng)
            if genome.key not in self.seen:
                return genome
            self.rebred += 1
        self.log(
            f"[eep] stopping: {cfg.max_breed_attempts} children in a row were already evaluated "
            f"(the search space has {self.schedule.size()} genomes)"
        )
        return None

    def landed(self, evaluation: Evaluation) -> None:
        """A result came back: evaluators answer in candidate order."""
        if evaluation.id != self.in_flight[0].id:
            raise RuntimeError(
                f"evaluator returned candidate {evaluation.id} before {self.in_flight[0].id}"
            )
        self.in_flight.popleft()

    def _save(self) -> None:
        in_flight = [
            {"id": c.id, "genome": c.genome.to_dict(), "bar": c.bar, "order": list(c.order)}
            for c in self.in_flight
        ]
        self.run.save_state(
            {
                "config_digest": self.digest,
                "config": self.outcome,
                "next_id": self.next_id,
                "rng": _rng_state_to_json(self.rng.getstate()),
                "in_flight": in_flight,
            }
        )


def _greedy_phase(
    run: RunDir, space, evaluator, records: list[Evaluation], log, progress: _Progress | None = None
) -> list[Evaluation]:
    """``search.warm_start: [greedy]``: greedy elimination (:mod:`eep.greedy`) as candidates 0..G-1,
    each batch through the evaluator and into the journal like any evaluation. Its steps that keep
    more experts than the space allows are marked ``outside`` (never parents, never the best). With
    ``search.early_cut`` an option is cut short once it cannot be taken (:func:`_greedy_bar`). On
    resume the journal's records stand in for the steps they hold (each checked against the genome
    the elimination asks for) and only the rest is evaluated. Returns the G records."""
    config = run.config()
    by_id = {e.id: e for e in records}
    done: list[Evaluation] = []
    steps = greedy.steps(space)
    fresh = not records
    if fresh:
        log(f"[eep] warm start: greedy elimination, {greedy.cost(space)} evaluations")
    try:
        batch = next(steps)
        while True:
            ids = range(len(done), len(done) + len(batch))
            for i, genome in zip(ids, batch):
                if i in by_id and by_id[i].genome.key != genome.key:
                    raise EepError(
                        f"journal record {i} is not the greedy warm start's step; the journal was written "
                        "by another config or version of eep"
                    )
            results = {i: by_id[i] for i in ids if i in by_id}
            pending = (
                Candidate(
                    i, genome, *_greedy_bar(config, space, batch, done, results, ids, p, evaluator)
                )
                for p, (i, genome) in enumerate(zip(ids, batch))
                if i not in by_id
            )
            for evaluation in evaluator.imap(pending):
                evaluation = replace(
                    evaluation, outside=space.reject(evaluation.genome) is not None
                )
                run.append(evaluation)
                results[evaluation.id] = evaluation
                if progress is not None:
                    progress.update(
                        [*done, *results.values()], evaluation, None, "greedy elimination"
                    )
            scored = [results[i] for i in ids]
            done.extend(scored)
            failed = next((r for r in scored if r.failed), None)
            if failed is not None:
                raise EepError(
                    f"the greedy warm start needs every step scored, and candidate {failed.id} "
                    f"failed ({failed.error})"
                )
            batch = steps.send([_greedy_score(r) for r in scored])
    except StopIteration:
        pass
    return done


def _greedy_score(record: Evaluation) -> float:
    """What greedy elimination compares: the fitness, or for a cut option its upper bound (below
    the bar it was cut at, so it is never taken)."""
    return record.fitness if record.ok else record.cut


def _greedy_bar(
    config, space, batch: greedy.Batch, done, results: dict, ids: range, p: int, evaluator
) -> tuple[float | None, tuple]:
    """The bar and example order of option ``p`` of a greedy batch. The bar is where the option can
    no longer be taken (:func:`eep.greedy.bar`), judged on the batch's options the evaluator has
    handed back when it asks for this one, those ``in_flight`` or more places before it: so it is
    the same serially, on Ray and on resume. An option inside the search space may also become a
    parent, the best or the export, so its bar is never above :func:`parent_bar` either."""
    cfg = config.search
    if not cfg.early_cut:
        return None, ()
    ahead = getattr(evaluator, "in_flight", cfg.in_flight)
    known = [results[i] for i in ids[: max(p - ahead + 1, 0)]]
    archive = done + known
    bar = greedy.bar(batch, [_greedy_score(r) for r in known])
    if bar is not None and space.reject(batch[p]) is None:
        pool = parent_bar(archive, cfg, export_top(config))
        bar = None if pool is None else min(bar, pool)
    tasks = [t.name for t in config.fitness.tasks]
    return bar, example_order(archive, batch[p], tasks) if bar is not None else ()


def _without_budget(outcome: dict) -> dict:
    return {**outcome, "search": {k: v for k, v in outcome["search"].items() if k != "evaluations"}}


class _Replay:
    """Stands in for the evaluator while a search is replayed from its journal: yields the
    journal's records for the re-bred candidates, pulling candidates exactly as an evaluator with
    ``in_flight`` slots does, then hands the rest (in-flight ones first) to the real evaluator."""

    def __init__(self, records: list[Evaluation], evaluator, in_flight: int):
        self.records, self.evaluator, self.in_flight = records, evaluator, in_flight

    def imap(self, candidates) -> Iterator[Evaluation]:
        pending = iter(candidates)
        queue = deque(itertools.islice(pending, self.in_flight))
        for record in self.records:
            candidate = queue.popleft() if queue else None
            if candidate is None or (candidate.id, candidate.genome.key) != (
                record.id,
                record.genome.key,
            ):
                raise EepError(
                    f"journal record {record.id} does not match a replay of this run's config (was it "
                    "written by another version of eep?); the search state cannot be rebuilt"
                )
            yield record
            queue.extend(itertools.islice(pending, 1))
        yield from self.evaluator.imap(itertools.chain(queue, pending))


def best_of(archive: list[Evaluation]) -> Evaluation | None:
    ok = [e for e in archive if e.candidate]
    return min(ok, key=by_fitness) if ok else None


def start_label(warm: str) -> str:
    """How the plan, the last line and the report name a warm start's genome (``warm``: ``greedy``,
    or a calibration warm start's name, :func:`eep.journal.warm_seed_name`)."""
    return "greedy elimination's result" if warm == "greedy" else f"{warm}'s genome"


def starts(
    run: RunDir, space, archive: list[Evaluation] | None = None
) -> list[tuple[str, Evaluation]]:
    """What ``run``'s search started from, as its journal (``archive``, when the caller has read
    it already) holds it, each with a name for the report: greedy elimination's result when it was
    the warm start (:func:`eep.greedy.steps` driven again by the journaled scores, so nothing is
    evaluated) and each seed genome (given, or a calibration warm start's); those scored in full
    and inside the search space, each record once."""
    cfg = run.config().search
    archive = run.evaluations() if archive is None else archive
    first: dict[str, Evaluation] = {}
    for e in archive:
        first.setdefault(e.genome.key, e)
    named = [
        (
            f"seed genome {path}"
            if warm_seed_name(path) is None
            else start_label(warm_seed_name(path)),
            Genome.load(run.path / path).key,
        )
        for path in cfg.seed_genomes
    ]
    if greedy.starts(cfg, Schedule.of(space).first):
        steps, done = greedy.steps(Schedule.of(space).first), 0
        try:
            batch = next(steps)
            while len(archive) >= done + len(batch):  # else stopped part-way: no result yet
                scored = archive[done : done + len(batch)]
                done += len(batch)
                batch = steps.send([_greedy_score(r) for r in scored])
        except StopIteration as finished:
            named.insert(0, (start_label("greedy"), finished.value[0].key))
    found: dict[int, tuple[str, Evaluation]] = {}
    for name, key in named:
        if key in first and first[key].candidate:
            found.setdefault(first[key].id, (name, first[key]))
    return list(found.values())


def by_fitness(e: Evaluation) -> tuple:
    """The default rank: search fitness, then the earlier."""
    return (-e.fitness, e.id)


def top_candidates(
    archive: list[Evaluation], top: int, rank: Callable[[Evaluation], tuple] = by_fitness
) -> list[Evaluation]:
    """The ``top`` best candidates by ``rank``."""
    return sorted((e for e in archive if e.candidate), key=rank)[:top]


def select(
    archive: list[Evaluation],
    validate: Callable[[Genome], float],
    top: int,
    rank: Callable[[Evaluation], tuple] = by_fitness,
    also: list[Evaluation] = (),
) -> tuple[Evaluation, dict]:
    """The genome to export: among the ``top`` best candidates by ``rank`` (default: search
    fitness, then the earlier) and those of ``also`` not among them (the search's :func:`starts`,
    so that the export never scores below them on validation), the best by ``validate`` (fitness
    on examples never searched on; ties: the earlier in ``rank``, ``also`` last). Returns it and
    the validation fitness of each candidate tried, by id: None for one cut short.

    The candidates race: each is validated in that order with the best score so far as its bar,
    ``validate(genome, bar)``, which may stop scoring one that cannot reach the bar and return None.
    Such a one could at best tie the earlier candidate that holds the bar, and ties go to the
    earlier, so the pick is the one a full scoring of every candidate makes."""
    ranked = top_candidates(archive, top, rank)
    ids = {e.id for e in ranked}
    ranked += sorted({e.id: e for e in also if e.candidate and e.id not in ids}.values(), key=rank)
    scores: dict[int, float | None] = {}
    chosen = None
    for e in ranked:
        scores[e.id] = validate(e.genome, None if chosen is None else scores[chosen.id])
        if scores[e.id] is not None and (chosen is None or scores[e.id] > scores[chosen.id]):
            chosen = e
    if chosen is None:
        raise ValueError("select: no candidate has a validation score")
    return chosen, scores


def summarise(archive: list[Evaluation]) -> dict:
    best = best_of(archive)
    cut = [e for e in archive if e.cut is not None]
    full = [e.seconds for e in archive if e.ok]
    return {
        "evaluations": len(archive),
        "failed": sum(e.failed for e in archive),
        "cut": len(cut),
        # each cut candidate against the mean time of a full evaluation in this run
        "cut_seconds_saved": sum(sum(full) / len(full) - e.seconds for e in cut)
        if full and cut
        else 0.0,
        "best_fitness": best.fitness if best else None,
        "best_id": best.id if best else None,
        "best_scores": best.scores if best else None,
        "best_genome": best.genome.to_dict() if best else None,
    }


def _rng_state_to_json(state: tuple) -> list:
    version, internal, gauss = state
    return [version, list(internal), gauss]


def _rng_state_from_json(data: list) -> tuple:
    version, internal, gauss = data
    return version, tuple(internal), gauss


class _Progress:
    """One line per evaluation when they are slow, at most one every two seconds when fast."""

    def __init__(self, total: int, log: Callable[[str], None]):
        self.total, self.log = total, log
        self.start, self.last, self.count = time.perf_counter(), 0.0, 0

    def update(
        self, archive: list[Evaluation], evaluation: Evaluation, busy: float | None, phase: str = ""
    ) -> None:
        self.count += 1
        now = time.perf_counter()
        if now - self.last < 2.0 and len(archive) < self.total:
            return
        self.last = now
        best = best_of(archive)
        last = (
            f"{evaluation.fitness:6.2f}"
            if evaluation.ok
            else f"<{evaluation.cut:5.1f}"
            if evaluation.cut is not None
            else "failed"
        )
        self.log(
            f"[eep] {len(archive):4d}/{self.total} evals  best "
            + (f"{best.fitness:6.2f}" if best else "     -")
            + f"  last {last}  {self.count / (now - self.start):5.2f} evals/s"
            + (f"  actors busy {100 * busy:3.0f}%" if busy is not None else "")
            + (f"  ({phase})" if phase else "")
        )
