"""Scoring a model (with whatever genome is applied to it) on loaded tasks.

A :class:`Scorer` is built on the *unpruned* model: tasks that compare with the full model
(``esap``, ``kl``, ``reconstruction``) compute its reference there, once. Each call then runs the
model as it is now: all options of choice tasks in one batched pass, one teacher-forced pass per
text task, then the generation tasks' examples chunk by chunk (``batch_size`` examples; the tasks
interleaved, or those a search names first one after another). In a chunk, ``exact_match`` examples are scored teacher-forced in one forward pass
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
    """A call stopped early: even a perfect rest could not reach ``cut_below``."""

    def __init__(self, bound: float, scored: float):
        super().__init__(f"fitness at most {bound:.2f} after {100 * scored:.0f}% of the examples")
        self.bound, self.scored = bound, scored


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

    def chunks_for(self, order: Sequence[str]) -> list[list[tuple[Task, int]]]:
        """The generation examples in chunks of ``batch_size``: the tasks named in ``order`` one
        after another, then the others interleaved example by example."""
        key = tuple(order)
        if key not in self._chunks:
            generated = {t.name: t for t in self.tasks if t.name in self.prompts}
            first = [generated[name] for name in key if name in generated]
            rest = [t for t in generated.values() if t not in first]
            items = [(t, i) for t in first for i in range(len(t.examples))]
            items += [
                (t, i)
                for i in range(max((len(t.examples) for t in rest), default=0))
                for t in rest
                if i < len(t.examples)
            ]
            self._chunks[key] = [
                items[s : s + self.batch_size] for s in range(0, len(items), self.batch_size)
            ]
        return self._chunks[key]

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
        order: Sequence[str] = (),
        progress: Callable[[], None] | None = None,
    ) -> dict[str, float]:
        """Per-task scores of the model as it is now — or of another ``model`` (e.g. an exported
        smaller one, with its MoE ``blocks``) against the same references. Fidelity tasks also
        record the other measure (``<task>.kl`` next to an ``esap`` task and vice versa).
        ``cut_below``: raise :class:`Cut` once the fitness cannot reach it; ``order``: generation tasks
        scored first, in this order (it decides how soon a cut comes, never a score); ``progress``:
        called after each chunk of generation examples."""
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
        return {t.name: scores[t.name] for t in self.tasks} | scores

    def example_scores(
        self,
        model=None,
        known: dict[str, float] | None = None,
        cut_below: float | None = None,
        order: Sequence[str] = (),
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
                    raise Cut(bound, done / total)
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
