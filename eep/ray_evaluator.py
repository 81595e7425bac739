"""Ray evaluator: a pool of actors, each holding one resident copy of the model.

Same seam as :class:`eep.evaluator.SerialEvaluator`: ``imap(candidates)`` yields evaluations in
candidate order and pulls the next candidate only after the caller folded a result, keeping
``in_flight`` candidates outstanding. Candidates go to the least loaded actor, so completion
order varies; the search does not, because it folds results by candidate id and breeds candidate
i from results 0..i-in_flight only. With ``in_flight`` above the number of actors, each actor
gets up to ceil(in_flight / actors) candidates at once and queues them: it starts the next as soon
as one ends, without waiting for the round trip through the driver (which idles an actor for the
time a result takes to reach the driver and the next candidate to come back).

The busy fraction is the actors' own evaluation time (``Evaluation.seconds``, measured in the
actor, placed at the time the driver received the result) over actors x wall time since the first
dispatch: time a candidate spends in transit or queued does not count as busy. In steady state
(``busy_fraction(steady=True)``) the window ends at the last dispatch, so the drain at the end of a
search, when no candidate is left to send, does not count as idle.

Faults: an actor that dies (process killed, node lost) is replaced by one new actor, and every
candidate it held (running or queued) is re-run; the journal records note the re-run. An exception inside an
evaluation is already a failed evaluation (see ``FitnessWorker``), not a crashed search.
"""

from __future__ import annotations

import itertools
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import replace

from eep.config import Config
from eep.errors import EepError
from eep.evaluator import Candidate, FitnessWorker
from eep.journal import Evaluation


def busy_share(
    finished: list[tuple[float, float]], start: float, end: float, actors: int
) -> float | None:
    """Share of ``actors`` x [start, end] spent evaluating, each evaluation ``(received at,
    seconds)`` taken as the interval [received - seconds, received], clipped to the window."""
    if end <= start:
        return None
    busy = sum(
        max(0.0, min(received, end) - max(received - seconds, start))
        for received, seconds in finished
    )
    return min(1.0, busy / (actors * (end - start)))


class RayEvaluator:
    def __init__(
        self, config: Config, log: Callable[[str], None] = print, worker_cls: type = FitnessWorker
    ):
        import ray

        cfg = config.evaluator
        self.config, self.log, self.in_flight = config, log, config.search.in_flight
        self._owns_runtime = not ray.is_initialized()
        if self._owns_runtime:
            if cfg.address:
                ray.init(address=cfg.address, include_dashboard=False, log_to_driver=False)
            else:
                ray.init(
                    num_cpus=cfg.workers or 1,
                    include_dashboard=False,
                    log_to_driver=False,
                    object_store_memory=256 * 1024**2,
                )
        resources = ray.cluster_resources()
        gpus = int(resources.get("GPU", 0))
        if gpus and config.model.device != "cpu":
            self._options = {"num_gpus": cfg.gpus_per_actor, "num_cpus": 1}
            fits = gpus // cfg.gpus_per_actor
            if fits == 0:
                self.close()
                raise EepError(
                    f"evaluator.gpus_per_actor={cfg.gpus_per_actor} but the cluster has {gpus} GPUs"
                )
        else:
            self._options = {"num_cpus": 1}
            fits = int(resources.get("CPU", 1))
        self.size = min(cfg.workers or fits, fits)
        log(
            f"[eep] ray: {self.size} actor(s) ({self._options}) on {len(ray.nodes())} node(s); "
            f"cluster offers {int(resources.get('CPU', 0))} CPUs, {gpus} GPUs"
        )
        self._actor_cls = ray.remote(max_restarts=0)(worker_cls)
        self._spawned = 0
        self.actors, self.names = [], []
        for _ in range(self.size):
            self._spawn()
        log(
            f"[eep] ray: models loaded on {', '.join(ray.get([a.ready.remote() for a in self.actors]))}"
        )
        # (received at, seconds evaluating) per evaluation
        self._finished: list[tuple[float, float]] = []
        self._last_dispatch = 0.0
        self._running: dict = {}  # object ref -> (candidate, actor index, actor handle, actor name)
        self._start: float | None = None

    def _spawn(self, index: int | None = None) -> None:
        """Start an actor (a new one, or the replacement of actor ``index``); it loads the model."""
        self._spawned += 1
        name = f"actor-{self._spawned}"
        actor = self._actor_cls.options(**self._options).remote(self.config, name=name)
        if index is None:
            self.actors.append(actor)
            self.names.append(name)
        else:
            self.actors[index], self.names[index] = actor, name

    def busy_fraction(self, steady: bool = False) -> float | None:
        """Share of actor time spent evaluating since the first dispatch (until the last dispatch
        with ``steady``)."""
        if self._start is None:
            return None
        return busy_share(
            self._finished,
            self._start,
            self._last_dispatch if steady else time.perf_counter(),
            self.size,
        )

    def imap(self, candidates: Iterable[Candidate]) -> Iterator[Evaluation]:
        import ray
        from ray.exceptions import RayActorError, RayTaskError

        pending = iter(candidates)
        order: deque[int] = deque()  # ids pulled, not yet yielded
        waiting: list[Candidate] = []  # pulled, not yet sent to an actor (by id)
        done: dict[int, Evaluation] = {}
        notes: dict[int, str] = {}
        depth = -(-self.in_flight // self.size)  # candidates an actor holds at once (queued in Ray)
        load = [0] * self.size
        self._start = self._start or time.perf_counter()

        def pull(n: int) -> None:
            for candidate in itertools.islice(pending, n):
                order.append(candidate.id)
                waiting.append(candidate)

        pull(self.in_flight)
        while order:
            while waiting and min(load) < depth:
                candidate, index = waiting.pop(0), load.index(min(load))
                ref = self.actors[index].evaluate.remote(candidate)
                self._running[ref] = (candidate, index, self.actors[index], self.names[index])
                load[index] += 1
                self._last_dispatch = time.perf_counter()
            if order[0] in done:
                evaluation = done.pop(order.popleft())
                yield evaluation
                pull(1)  # after the caller folded the result
                continue
            ready, _ = ray.wait(list(self._running), num_returns=1)
            for ref in ready:
                candidate, index, actor, name = self._running.pop(ref)
                load[index] -= 1
                try:
                    evaluation = ray.get(ref)
                except RayActorError as err:
                    # the first of its candidates to report the loss
                    if self.actors[index] is actor:
                        self.log(
                            f"[eep] ray: {name} died while evaluating candidate {candidate.id} "
                            f"({type(err).__name__}); replacing it and re-running its candidates"
                        )
                        self._spawn(index)
                    notes[candidate.id] = f"re-run: {name} died ({type(err).__name__})"
                    waiting.append(candidate)
                    waiting.sort(key=lambda c: c.id)
                    continue
                except RayTaskError as err:
                    evaluation = Evaluation(
                        candidate.id,
                        candidate.genome,
                        None,
                        {},
                        0.0,
                        self.names[index],
                        f"{type(err).__name__}: {err}".splitlines()[0],
                    )
                self._finished.append((time.perf_counter(), evaluation.seconds))
                if candidate.id in notes:
                    evaluation = replace(evaluation, note=notes.pop(candidate.id))
                done[candidate.id] = evaluation

    def heldout(self, genome, split: str = "test", cut_below: float | None = None, order=()):
        import ray

        return ray.get(self.actors[0].reaching.remote(genome, split, cut_below, order))

    def latency(self, genome) -> float:
        """The first actor's :meth:`eep.evaluator.FitnessWorker.latency` of ``genome``."""
        import ray

        return ray.get(self.actors[0].latency.remote(genome))

    def milliseconds(self, genome) -> float:
        """The first actor's :meth:`eep.evaluator.FitnessWorker.milliseconds` of ``genome``."""
        import ray

        return ray.get(self.actors[0].milliseconds.remote(genome))

    def close(self) -> None:
        import ray

        for actor in getattr(self, "actors", []):
            ray.kill(actor)
        self.actors = []
        if self._owns_runtime and ray.is_initialized():
            ray.shutdown()
