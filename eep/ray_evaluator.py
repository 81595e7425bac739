"""Ray evaluator: a pool of actors, each holding one resident copy of the model.

Same seam as :class:`eep.evaluator.SerialEvaluator`: ``imap(candidates)`` yields evaluations in
candidate order and pulls the next candidate only after the caller folded a result, keeping
``in_flight`` candidates outstanding. Candidates go to whichever actor is free, so completion
order varies; the search does not, because it folds results by candidate id and breeds candidate
i from results 0..i-in_flight only.

Faults: an actor that dies (process killed, node lost) is replaced by a new one, and its
candidate is re-run there; the journal record notes the re-run. An exception inside an
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


class RayEvaluator:
    def __init__(self, config: Config, log: Callable[[str], None] = print, worker_cls: type = FitnessWorker):
        import ray

        cfg = config.evaluator
        self.config, self.log, self.in_flight = config, log, config.search.in_flight
        self._owns_runtime = not ray.is_initialized()
        if self._owns_runtime:
            if cfg.address:
                ray.init(address=cfg.address, include_dashboard=False, log_to_driver=False)
            else:
                ray.init(num_cpus=cfg.workers or 1, include_dashboard=False, log_to_driver=False,
                         object_store_memory=256 * 1024**2)
        resources = ray.cluster_resources()
        gpus = int(resources.get("GPU", 0))
        if gpus and config.model.device != "cpu":
            self._options = {"num_gpus": cfg.gpus_per_actor, "num_cpus": 1}
            fits = gpus // cfg.gpus_per_actor
            if fits == 0:
                self.close()
                raise EepError(f"evaluator.gpus_per_actor={cfg.gpus_per_actor} but the cluster has {gpus} GPUs")
        else:
            self._options = {"num_cpus": 1}
            fits = int(resources.get("CPU", 1))
        self.size = min(cfg.workers or fits, fits)
        log(f"[eep] ray: {self.size} actor(s) ({self._options}) on {len(ray.nodes())} node(s); "
            f"cluster offers {int(resources.get('CPU', 0))} CPUs, {gpus} GPUs")
        self._actor_cls = ray.remote(max_restarts=0)(worker_cls)
        self._spawned = 0
        self.actors, self.names = [], []
        for _ in range(self.size):
            self._spawn()
        log(f"[eep] ray: models loaded on {', '.join(ray.get([a.ready.remote() for a in self.actors]))}")
        self._busy = [0.0] * self.size
        self._running: dict = {}  # object ref -> (candidate, actor index, start time)
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

    def busy_fraction(self) -> float | None:
        """Share of actor time spent evaluating since the first dispatch."""
        if self._start is None:
            return None
        now = time.perf_counter()
        busy = sum(self._busy) + sum(now - started for _, _, started in self._running.values())
        return min(1.0, busy / (self.size * (now - self._start))) if now > self._start else None

    def imap(self, candidates: Iterable[Candidate]) -> Iterator[Evaluation]:
        import ray
        from ray.exceptions import RayActorError, RayTaskError

        pending = iter(candidates)
        order: deque[int] = deque()           # ids pulled, not yet yielded
        waiting: deque[Candidate] = deque()   # pulled, not yet sent to an actor
        done: dict[int, Evaluation] = {}
        notes: dict[int, str] = {}
        idle = deque(range(self.size))
        self._start = self._start or time.perf_counter()

        def pull(n: int) -> None:
            for candidate in itertools.islice(pending, n):
                order.append(candidate.id)
                waiting.append(candidate)

        pull(self.in_flight)
        while order:
            while waiting and idle:
                candidate, index = waiting.popleft(), idle.popleft()
                ref = self.actors[index].evaluate.remote(candidate)
                self._running[ref] = (candidate, index, time.perf_counter())
            if order[0] in done:
                evaluation = done.pop(order.popleft())
                yield evaluation
                pull(1)  # after the caller folded the result
                continue
            ready, _ = ray.wait(list(self._running), num_returns=1)
            for ref in ready:
                candidate, index, started = self._running.pop(ref)
                self._busy[index] += time.perf_counter() - started
                try:
                    evaluation = ray.get(ref)
                except RayActorError as err:
                    lost = self.names[index]
                    self.log(f"[eep] ray: {lost} died while evaluating candidate {candidate.id} "
                             f"({type(err).__name__}); replacing it and re-running the candidate")
                    notes[candidate.id] = f"re-run: {lost} died ({type(err).__name__})"
                    self._spawn(index)
                    waiting.appendleft(candidate)
                    idle.append(index)
                    continue
                except RayTaskError as err:
                    evaluation = Evaluation(candidate.id, candidate.genome, None, {}, 0.0,
                                            self.names[index], f"{type(err).__name__}: {err}".splitlines()[0])
                if candidate.id in notes:
                    evaluation = replace(evaluation, note=notes.pop(candidate.id))
                done[candidate.id] = evaluation
                idle.append(index)

    def heldout(self, genome) -> dict[str, float]:
        import ray

        return ray.get(self.actors[0].scores.remote(genome, "test"))

    def close(self) -> None:
        import ray

        for actor in getattr(self, "actors", []):
            ray.kill(actor)
        self.actors = []
        if self._owns_runtime and ray.is_initialized():
            ray.shutdown()

