"""The evaluator seam: where parallelism enters (DEAP's ``toolbox.map`` idea).

A :class:`FitnessWorker` holds one resident model and scores genomes on it by applying them in
place. An evaluator maps candidates to evaluations through one or more workers. The search loop
only ever calls ``evaluator.imap(candidates)``, which yields evaluations *in candidate order*
and pulls a new candidate from the (lazy) iterable only after yielding a result, so a search is
reproducible whatever the evaluator. The serial evaluator here is the default; a Ray evaluator
with resident-model actors implements the same method.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import socket
import time
from collections import deque
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

from eep.config import Config
from eep.errors import EepError
from eep.genome import Genome
from eep.journal import Evaluation


@dataclass(frozen=True)
class Candidate:
    id: int
    genome: Genome
    bar: float | None = None
    """Fitness below which the search would never use this candidate (see ``eep.loop.parent_bar``):
    a worker may stop scoring it once it cannot reach this."""
    order: tuple = ()
    """Examples to score first, the likeliest misses (``eep.loop.example_order``: ``(task, index)``
    pairs, or task names), so that a cut comes early; never changes a score."""


class FitnessWorker:
    """One resident copy of the model plus the tasks; scores genomes without reloading anything."""

    def __init__(self, config: Config, name: str | None = None):
        from eep.model import load_model
        from eep.moe import adapter_for, moe_blocks
        from fitness.scoring import Scorer
        from fitness.tasks import load_tasks

        self.config = config
        self.name = (
            f"{name or 'worker'}@{socket.gethostname()}:{os.getpid()}"  # journaled per evaluation
        )
        splits = (
            ("search", "test", "validation") if config.fitness.validates else ("search", "test")
        )
        # data errors first
        tasks = {split: load_tasks(config.fitness.tasks, split) for split in splits}
        self.model, self.tokenizer = load_model(config.model)
        try:
            self.adapter = adapter_for(self.model)
        except EepError:  # e.g. eep's custom-form export: scored as it is, no genome applied to it
            self.adapter = None
        fit = config.fitness
        self._batch = None  # what a latency is timed on (latency_batch)
        self.scorers = {
            split: Scorer(
                self.model,
                self.tokenizer,
                tasks[split],
                fit.batch_size,
                fit.max_new_tokens,
                fit.max_length,
                moe_blocks(self.model),
                fit.scoring,
            )
            for split in tasks
        }

    def scores(
        self,
        genome: Genome | None,
        split: str = "search",
        skip: dict[int, float] | None = None,
        cut_below: float | None = None,
        order: tuple = (),
    ) -> dict[str, float]:
        """Per-task scores of ``genome`` (``None``: the unpruned model) on a split; ``skip``: NAEE
        dynamic-skipping thresholds by layer, an inference option on top of the genome; ``cut_below``:
        raise :class:`fitness.scoring.Cut` once the fitness cannot reach it; ``order``: tasks or
        examples scored first."""
        return self.detailed(genome, split, skip, cut_below, order)[0]

    def detailed(
        self,
        genome: Genome | None,
        split: str = "search",
        skip: dict[int, float] | None = None,
        cut_below: float | None = None,
        order: tuple = (),
    ) -> tuple[dict[str, float], dict[str, list[float | None]]]:
        """:meth:`scores`, and each generation example's score by task."""
        if genome is not None and self.adapter is None:
            raise EepError(
                f"cannot apply a genome to {self.config.model.path} ({self.model.config.model_type}); "
                "give the source model"
            )
        context = (
            self.adapter.applied(genome, skip=skip)
            if genome is not None
            else contextlib.nullcontext()
        )
        with context:
            return self.scorers[split].score(cut_below=cut_below, order=order)

    def latency(self, genome: Genome | None, skip: dict[int, float] | None = None) -> float:
        """The time a forward pass takes with ``genome`` applied as a share of the unpruned
        model's, timed just before and just after it (:meth:`milliseconds` each; their mean is the
        reference): the machine's speed drifts (its load, its clock) and a share taken within
        seconds does not (on 2 CPU cores with one of them made busy, a genome's milliseconds rose
        117 % and its share 5 %). ``None``: the unpruned model against itself, about 1 (how far
        from it says what a share's noise is). ``skip``: NAEE dynamic skipping."""
        before = self.milliseconds(None)
        mine = self.milliseconds(genome, skip=skip)
        return mine / ((before + self.milliseconds(None)) / 2)

    def milliseconds(
        self,
        genome: Genome | None,
        repeats: int | None = None,
        skip: dict[int, float] | None = None,
    ) -> float:
        """Milliseconds one forward pass (a prefill) of a fixed batch takes with ``genome`` applied
        (a pruning genome compacted, :meth:`eep.moe.MoEAdapter.compacted`: the exported model's
        modules and shapes; ``None``: the unpruned model; ``skip``: with NAEE dynamic skipping):
        the fastest of ``repeats`` (``search.latency_repeats``) timed passes after one untimed
        (whatever else runs only slows a pass, so the fastest is the steadier estimate).
        The batch is the first ``fitness.batch_size`` search examples, tasks in turn, so the
        routing is the tasks'."""
        import torch

        if genome is not None and self.adapter is None:
            raise EepError(
                f"cannot apply a genome to {self.config.model.path}; give the source model"
            )
        batch = self.latency_batch()
        device = self.model.device

        def synchronize() -> None:  # every GPU a model split over (device_map: auto) has worked
            if device.type == "cuda":
                for index in range(torch.cuda.device_count()):
                    torch.cuda.synchronize(index)

        # a pruning genome as the smaller model it exports (no routing hooks: their cost is
        # not the exported model's); merge and low-rank genes as the search applies them
        context = (
            contextlib.nullcontext()
            if genome is None
            else self.adapter.compacted(genome, skip)
            if not (genome.is_merge or genome.is_low_rank)
            else self.adapter.applied(genome, skip=skip)
        )
        times = []
        with context, torch.no_grad():
            for _ in range(1 + (repeats or self.config.search.latency_repeats)):
                synchronize()
                start = time.perf_counter()
                self.model(**batch)
                synchronize()
                times.append(time.perf_counter() - start)
        return 1000.0 * min(times[1:])

    def latency_batch(self) -> dict:
        """The inputs a latency is timed on (made on first use): the first ``fitness.batch_size``
        search examples, the tasks in turn, tokenized and padded."""
        if self._batch is None:
            fit = self.config.fitness
            texts = [
                [ex.prompt or "".join(ex.options[0]) for ex in task.examples]
                for task in self.scorers["search"].tasks
            ]
            # round robin over the tasks, so that a batch smaller than the examples has them all
            rows = [
                t[i] for i in range(max(map(len, texts), default=0)) for t in texts if i < len(t)
            ]
            if not rows:
                raise EepError("a latency measurement needs search examples; the tasks have none")
            self._batch = self.tokenizer(
                rows[: fit.batch_size],
                return_tensors="pt",
                padding=True,
                truncation=True,
                max_length=fit.max_length,
            ).to(self.model.device)
        return self._batch

    def reaching(
        self,
        genome: Genome | None,
        split: str,
        cut_below: float | None = None,
        order: tuple = (),
    ) -> dict[str, float] | None:
        """:meth:`scores` on ``split``, or None once their weighted fitness over the split's tasks
        cannot reach ``cut_below`` (a validation pick racing its candidates); ``order``: tasks
        scored first."""
        from fitness.scoring import Cut

        try:
            return self.scores(genome, split, cut_below=cut_below, order=order)
        except Cut:
            return None

    def fitness(self, scores: dict[str, float]) -> float:
        from fitness.metrics import weighted_fitness

        return weighted_fitness(self.config.fitness.tasks, scores)

    def ready(self) -> str:
        """Returns the worker's name once its model is loaded (Ray actors are awaited on this)."""
        return self.name

    def __call__(self, candidate: Candidate) -> Evaluation:
        from fitness.scoring import Cut, verdicts

        start = time.perf_counter()
        latency = None
        try:
            if (
                "latency" in self.config.search.objectives
            ):  # measured before any scoring warms caches
                latency = self.latency(candidate.genome)
            scores, hits = self.detailed(
                candidate.genome, cut_below=candidate.bar, order=candidate.order
            )
        except Cut as cut:
            return Evaluation(
                candidate.id,
                candidate.genome,
                None,
                {},
                time.perf_counter() - start,
                self.name,
                cut=cut.bound,
                examples=verdicts(cut.hits) or None,
            )
        except Exception as err:  # one failing genome is a failed evaluation, not a crashed search
            return Evaluation(
                candidate.id,
                candidate.genome,
                None,
                {},
                time.perf_counter() - start,
                self.name,
                f"{type(err).__name__}: {err}",
            )
        return Evaluation(
            candidate.id,
            candidate.genome,
            self.fitness(scores),
            scores,
            time.perf_counter() - start,
            self.name,
            examples=verdicts(hits) or None,
            latency=latency,
        )

    evaluate = __call__  # Ray actors expose named methods only


class SerialEvaluator:
    """Evaluates candidates one after another in this process, on one resident model.

    It still pulls ``in_flight`` candidates ahead, exactly as a pool of ``in_flight`` workers
    would, so that a serial run reproduces a parallel one.
    """

    def __init__(self, worker: FitnessWorker, in_flight: int = 1):
        self.worker = worker
        self.in_flight = in_flight

    def imap(self, candidates: Iterable[Candidate]) -> Iterator[Evaluation]:
        pending = iter(candidates)
        queue = deque(itertools.islice(pending, self.in_flight))
        while queue:
            yield self.worker(queue.popleft())
            queue.extend(itertools.islice(pending, 1))  # after the caller folded the result

    def busy_fraction(self) -> float | None:
        return None  # one in-process worker: nothing to report

    def heldout(
        self,
        genome: Genome | None,
        split: str = "test",
        cut_below: float | None = None,
        order: tuple = (),
    ) -> dict[str, float] | None:
        """Scores on a split never searched on (``test``: held out; ``validation``: picks the
        export); None once they cannot reach ``cut_below`` (:meth:`FitnessWorker.reaching`)."""
        return self.worker.reaching(genome, split, cut_below, order)

    def latency(self, genome: Genome | None) -> float:
        """:meth:`FitnessWorker.latency` of ``genome`` (``None``: the unpruned model's, about 1)."""
        return self.worker.latency(genome)

    def milliseconds(self, genome: Genome | None) -> float:
        """:meth:`FitnessWorker.milliseconds` of ``genome`` (``None``: the unpruned model)."""
        return self.worker.milliseconds(genome)

    def close(self) -> None:
        pass
