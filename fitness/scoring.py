"""Scoring a model (with whatever genome is applied to it) on loaded tasks.

A :class:`Scorer` is built on the *unpruned* model: tasks that compare with the full model
(``esap``, ``kl``, ``reconstruction``) compute its reference there, once. Each call then runs the
model as it is now: all generation prompts in one batched pass, all options of choice tasks in
another, and one teacher-forced pass per text task.
"""

from __future__ import annotations

from collections.abc import Sequence

from eep.errors import EepError
from fitness.generation import greedy_generate
from fitness.likelihood import Reference, TextBatches, continuation_logprobs, perplexity
from fitness.metrics import best_choice, cut_at_stop, generation_score, metric
from fitness.tasks import Task


class Scorer:
    def __init__(self, model, tokenizer, tasks: Sequence[Task], batch_size: int = 32, max_new_tokens: int = 16,
                 max_length: int = 2048, blocks: dict | None = None):
        """``blocks``: the MoE blocks by layer (``adapter.blocks``), needed by ``reconstruction``."""
        self.model, self.tokenizer, self.tasks, self.blocks = model, tokenizer, list(tasks), blocks
        self.batch_size, self.max_new_tokens, self.max_length = batch_size, max_new_tokens, max_length
        self.prompts = {t.name: [self._chat(t, ex.prompt) for ex in t.examples]
                        for t in self.tasks if metric(t.metric).kind == "generate"}
        self.options = [(self._chat(t, ctx), cont) for t in self.tasks if metric(t.metric).kind == "choice"
                        for ex in t.examples for ctx, cont in ex.options]
        self.texts, self.references = {}, {}
        for task in self.tasks:
            if metric(task.metric).kind != "text":
                continue
            self.texts[task.name] = TextBatches(tokenizer, [ex.prompt for ex in task.examples], batch_size, max_length)
            if task.metric in ("esap", "kl", "reconstruction"):
                if task.metric == "reconstruction" and not blocks:
                    raise EepError(f"task {task.name!r}: reconstruction needs the model's MoE blocks")
                self.references[task.name] = Reference(
                    model, self.texts[task.name], blocks if task.metric == "reconstruction" else None,
                    distributions=task.metric != "reconstruction")

    def _chat(self, task: Task, prompt: str) -> str:
        if not task.chat_template:
            return prompt
        if not getattr(self.tokenizer, "chat_template", None):
            raise EepError(f"task {task.name!r} asks for chat_template but the tokenizer has none; "
                           "set chat_template: false")
        return self.tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                                  add_generation_prompt=True)

    def __call__(self, model=None, blocks: dict | None = None) -> dict[str, float]:
        """Per-task scores of the model as it is now — or of another ``model`` (e.g. an exported
        smaller one, with its MoE ``blocks``) against the same references. Fidelity tasks also
        record the other measure (``<task>.kl`` next to an ``esap`` task and vice versa)."""
        model = model if model is not None else self.model
        blocks = blocks if blocks is not None else self.blocks
        scores: dict[str, float] = {}
        scores.update(self._generation(model))
        scores.update(self._choices(model))
        for task in self.tasks:
            if task.metric == "perplexity":
                scores[task.name] = perplexity(model, self.texts[task.name])
            elif task.metric in ("esap", "kl"):
                esap, kl = self.references[task.name].fidelity(model)
                scores[task.name] = esap if task.metric == "esap" else kl
                scores[f"{task.name}.{'kl' if task.metric == 'esap' else 'esap'}"] = kl if task.metric == "esap" else esap
            elif task.metric == "reconstruction":
                scores[task.name] = self.references[task.name].reconstruction(model, blocks)
        return {t.name: scores[t.name] for t in self.tasks} | scores

    def _generation(self, model) -> dict[str, float]:
        tasks = [t for t in self.tasks if t.name in self.prompts]
        if not tasks:
            return {}
        completions = iter(greedy_generate(model, self.tokenizer, [p for t in tasks for p in self.prompts[t.name]],
                                           self.batch_size, self.max_new_tokens))
        scores = {}
        for task in tasks:
            hits = [generation_score(task.metric, cut_at_stop(next(completions), task.stop), ex.answers)
                    for ex in task.examples]
            scores[task.name] = 100.0 * sum(hits) / len(hits)
        return scores

    def _choices(self, model) -> dict[str, float]:
        tasks = [t for t in self.tasks if metric(t.metric).kind == "choice"]
        if not tasks:
            return {}
        logprobs = iter(continuation_logprobs(model, self.tokenizer, self.options, self.batch_size,
                                              self.max_length))
        scores = {}
        for task in tasks:
            hits = 0
            for ex in task.examples:
                values = [next(logprobs) for _ in ex.options]
                hits += best_choice(values, [c for _, c in ex.options], task.metric == "choice_norm") == ex.label
            scores[task.name] = 100.0 * hits / len(task.examples)
        return scores
