"""Scoring a model (with whatever genome is applied to it) on loaded tasks.

A :class:`Scorer` is built on the *unpruned* model: tasks that compare with the full model
(``esap``, ``kl``, ``reconstruction``) compute its reference there, once. Each call then runs the
model as it is now: all options of choice tasks in one batched pass, one teacher-forced pass per
text task, then the generation tasks' examples chunk by chunk (``batch_size`` examples; the tasks
interleaved, or the tasks or single examples a search names first, in its order). In a chunk, ``exact_match`` examples are scored teacher-forced in one forward pass
(:mod:`fitness.teacher_forcing`) and the rest — other metrics, and examples the forward pass leaves
undecided — by greedy generation. ``scoring="generate"`` generates every example instead.

After each chunk the weighted fitness is bounded above (every example not yet scored counted as a
hit); a call given ``cut_below`` stops with :class:`Cut` as soon as that bound falls below it.
The chunks are the same whether or not a call may stop, so a call that runs to the end scores
exactly what an uncut one does.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from eep.errors import EepError
from fitness import teacher_forcing
from fitness.generation import greedy_generate
from fitness.likelihood import Reference, TextBatches, continuation_logprobs, perplexity
from fitness.metrics import best_choice, cut_at_stop, generation_score, metric, weighted_fitness
from fitness.tasks import Task


class Cut(Exception):
    """A call stopped early: even a perfect rest could not reach ``cut_below``. ``hits``: the
    examples scored by then (as :meth:`Scorer.example_scores`, None where not scored)."""

    def __init__(self, bound: float, scored: float, hits: dict | None = None):
        super().__init__(f"fitness at most {bound:.2f} after {100 * scored:.0f}% of the examples")
        self.bound, self.scored, self.hits = bound, scored, hits or {}


def verdicts(hits: dict[str, list[float | None]]) -> dict[str, str]:
    """Per-example results as one short string per task, what a journal record keeps for the early
    cut's ordering: ``1`` a full score, ``0`` anything less, ``.`` not scored."""
    return {
        name: "".join("." if h is None else "1" if h >= 1 else "0" for h in values)
        for name, values in hits.items()
    }


def scoring_path(metric_name: str, why_not: str | None = None) -> str:
    """How a task of this metric is scored: ``teacher-forced``, ``generated (why)``, ``likelihood``
    or ``text``; ``why_not``: why teacher forcing is off (e.g. ``fitness.scoring: generate``)."""
    kind = metric(metric_name).kind
    if kind != "generate":
        return "likelihood" if kind == "choice" else "text"
    if metric_name != "exact_match":
        return f"generated ({metric_name} compares free text)"
    return f"generated ({why_not})" if why_not else "teacher-forced"


class Scorer:
    def __init__(
        self,
        model,
        tokenizer,
        tasks: Sequence[Task],
        batch_size: int = 32,
        max_new_tokens: int = 16,
        max_length: int = 2048,
        blocks: dict | None = None,
        scoring: str = "auto",
    ):
        """``blocks``: the MoE blocks by layer (``adapter.blocks``), needed by ``reconstruction``.
        ``scoring``: ``auto`` (teacher-forced exact match where it is exact) or ``generate``."""
        if scoring not in ("auto", "generate"):
            raise ValueError(f"scoring must be 'auto' or 'generate', got {scoring!r}")
        self.model, self.tokenizer, self.tasks, self.blocks = model, tokenizer, list(tasks), blocks
        self.batch_size, self.max_new_tokens, self.max_length = (
            batch_size,
            max_new_tokens,
            max_length,
        )
        self.prompts = {
            t.name: [self._chat(t, ex.prompt) for ex in t.examples]
            for t in self.tasks
            if metric(t.metric).kind == "generate"
        }
        self.paths = self._paths(scoring)
        self.items = {
            t.name: [
                teacher_forcing.prepare(tokenizer, p, ex.answers, t.stop, max_new_tokens)
                if self.paths[t.name] == "teacher-forced"
                else None
                for p, ex in zip(self.prompts[t.name], t.examples)
            ]
            for t in self.tasks
            if t.name in self.prompts
        }
        self._chunks: dict[tuple[str, ...], list] = {}
        self.chunks = self.chunks_for(())
        self.options = [
            (self._chat(t, ctx), cont)
            for t in self.tasks
            if metric(t.metric).kind == "choice"
            for ex in t.examples
            for ctx, cont in ex.options
        ]
        self.texts, self.references = {}, {}
        for task in self.tasks:
            if metric(task.metric).kind != "text":
                continue
            self.texts[task.name] = TextBatches(
                tokenizer, [ex.prompt for ex in task.examples], batch_size, max_length
            )
            if task.metric in ("esap", "kl", "reconstruction"):
                if task.metric == "reconstruction" and not blocks:
                    raise EepError(
                        f"task {task.name!r}: reconstruction needs the model's MoE blocks"
                    )
                self.references[task.name] = Reference(
                    model,
                    self.texts[task.name],
                    blocks if task.metric == "reconstruction" else None,
                    distributions=task.metric != "reconstruction",
                )

    def chunks_for(self, order: Sequence) -> list[list[tuple[Task, int]]]:
        """The generation examples in chunks of ``batch_size``: those ``order`` names first, in its
        order — tasks (names: each task's examples one after another) or single examples (``(task
        name, index)`` pairs) — then the others interleaved task by task."""
        key = tuple(o if isinstance(o, str) else tuple(o) for o in order)
        if key in self._chunks:
            return self._chunks[key]
        generated = {t.name: t for t in self.tasks if t.name in self.prompts}
        items: list[tuple[Task, int]] = []
        seen: set[tuple[str, int]] = set()
        for o in key:
            name = o if isinstance(o, str) else o[0]
            task = generated.get(name)
            if task is None:
                continue
            for i in range(len(task.examples)) if isinstance(o, str) else o[1:]:
                if 0 <= i < len(task.examples) and (name, i) not in seen:
                    seen.add((name, i))
                    items.append((task, i))
        items += [
            (t, i)
            for i in range(max((len(t.examples) for t in generated.values()), default=0))
            for t in generated.values()
            if i < len(t.examples) and (t.name, i) not in seen
        ]
        chunks = [items[s : s + self.batch_size] for s in range(0, len(items), self.batch_size)]
        if all(isinstance(o, str) for o in key):  # a candidate's own example order is not kept
            self._chunks[key] = chunks
        return chunks

    def _paths(self, scoring: str) -> dict[str, str]:
        why_not = (
            "fitness.scoring: generate"
            if scoring == "generate"
            else teacher_forcing.greedy_is_argmax(self.model)
        )
        return {t.name: scoring_path(t.metric, why_not) for t in self.tasks}

    def describe(self) -> str:
        """One line: how each task is scored (shown in the plan)."""
        return ", ".join(f"{name} {path}" for name, path in self.paths.items())

    def _chat(self, task: Task, prompt: str) -> str:
        if not task.chat_template:
            return prompt
        if not getattr(self.tokenizer, "chat_template", None):
            raise EepError(
                f"task {task.name!r} asks for chat_template but the tokenizer has none; "
                "set chat_template: false"
            )
        return self.tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
        )

    def __call__(
        self,
        model=None,
        blocks: dict | None = None,
        cut_below: float | None = None,
        order: Sequence = (),
        progress: Callable[[], None] | None = None,
    ) -> dict[str, float]:
        """Per-task scores of the model as it is now — or of another ``model`` (e.g. an exported
        smaller one, with its MoE ``blocks``) against the same references. Fidelity tasks also
        record the other measure (``<task>.kl`` next to an ``esap`` task and vice versa).
        ``cut_below``: raise :class:`Cut` once the fitness cannot reach it; ``order``: generation tasks
        or single examples scored first, in this order (:meth:`chunks_for`; it decides how soon a
        cut comes, never a score); ``progress``:
        called after each chunk of generation examples."""
        return self.score(model, blocks, cut_below, order, progress)[0]

    def score(
        self,
        model=None,
        blocks: dict | None = None,
        cut_below: float | None = None,
        order: Sequence = (),
        progress: Callable[[], None] | None = None,
    ) -> tuple[dict[str, float], dict[str, list[float | None]]]:
        """What a call returns, and each generation example's score by task (:meth:`example_scores`)."""
        model = model if model is not None else self.model
        blocks = blocks if blocks is not None else self.blocks
        scores: dict[str, float] = {}
        scores.update(self._choices(model))
        for task in self.tasks:
            if task.metric == "perplexity":
                scores[task.name] = perplexity(model, self.texts[task.name])
            elif task.metric in ("esap", "kl"):
                esap, kl = self.references[task.name].fidelity(model)
                scores[task.name] = esap if task.metric == "esap" else kl
                scores[f"{task.name}.{'kl' if task.metric == 'esap' else 'esap'}"] = (
                    kl if task.metric == "esap" else esap
                )
            elif task.metric == "reconstruction":
                scores[task.name] = self.references[task.name].reconstruction(model, blocks)
        hits = self.example_scores(model, scores, cut_below, order, progress)
        scores.update({name: 100.0 * sum(values) / len(values) for name, values in hits.items()})
        return {t.name: scores[t.name] for t in self.tasks} | scores, hits

    def example_scores(
        self,
        model=None,
        known: dict[str, float] | None = None,
        cut_below: float | None = None,
        order: Sequence = (),
        progress: Callable[[], None] | None = None,
    ) -> dict[str, list[float]]:
        """Each generation example's score (0-1) by task, chunk by chunk; ``known``: the other
        tasks' scores, for the bound that ``cut_below`` is checked against."""
        model = model if model is not None else self.model
        hits: dict[str, list[float | None]] = {
            name: [None] * len(p) for name, p in self.prompts.items()
        }
        chunks = self.chunks_for(order)
        total = sum(len(c) for c in chunks)
        done = 0
        for chunk in chunks:
            self._score_chunk(model, chunk, hits)
            done += len(chunk)
            if progress is not None:
                progress()
            if cut_below is not None and done < total:
                bound = weighted_fitness(
                    self.tasks,
                    (known or {})
                    | {
                        name: 100.0 * sum(1.0 if h is None else h for h in values) / len(values)
                        for name, values in hits.items()
                    },
                )
                if bound < cut_below:
                    raise Cut(bound, done / total, hits)
        return hits

    def _score_chunk(self, model, chunk, hits: dict[str, list[float | None]]) -> None:
        forced = [(t, i) for t, i in chunk if self.items[t.name][i] is not None]
        verdicts = teacher_forcing.teacher_forced(
            model, self.tokenizer, [self.items[t.name][i] for t, i in forced], self.max_new_tokens
        )
        for (task, i), verdict in zip(forced, verdicts, strict=True):
            hits[task.name][i] = None if verdict is None else float(verdict)
        rest = [(t, i) for t, i in chunk if hits[t.name][i] is None]
        completions = greedy_generate(
            model,
            self.tokenizer,
            [self.prompts[t.name][i] for t, i in rest],
            self.batch_size,
            self.max_new_tokens,
        )
        for (task, i), completion in zip(rest, completions, strict=True):
            hits[task.name][i] = generation_score(
                task.metric, cut_at_stop(completion, task.stop), task.examples[i].answers
            )

    def _choices(self, model) -> dict[str, float]:
        tasks = [t for t in self.tasks if metric(t.metric).kind == "choice"]
        if not tasks:
            return {}
        logprobs = iter(
            continuation_logprobs(
                model, self.tokenizer, self.options, self.batch_size, self.max_length
            )
        )
        scores = {}
        for task in tasks:
            hits = 0
            for ex in task.examples:
                values = [next(logprobs) for _ in ex.options]
                hits += (
                    best_choice(values, [c for _, c in ex.options], task.metric == "choice_norm")
                    == ex.label
                )
            scores[task.name] = 100.0 * hits / len(task.examples)
        return scores
