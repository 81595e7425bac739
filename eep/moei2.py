"""MoE-I² (arXiv 2411.01016) on eep's engine: two task-agnostic stages from one calibration set.

Stage 1, non-uniform pruning:
1. expert importance — the MoE-output loss of removing one expert (:func:`expert_importance`),
   layer importance the sum over its experts, and from it per-layer keep counts under a global
   budget (:func:`layer_keep_counts`);
2. a layer-wise genetic search per MoE layer over which experts it keeps (its count from step 1),
   fitness minus the percent of the layer's MoE-output energy lost on the calibration tokens. It
   *is* eep's search (:func:`eep.loop.run_search`): the DEAP toolbox of a one-layer
   :class:`search_spaces.PruneSpace`, the evaluator seam, a journal and snapshot per layer under
   ``RUN_DIR/stage1/layer-NN``, resumed by reopening them. Each layer passes on its K best distinct
   keep sets;
3. the KT receptive field: consecutive blocks of T MoE layers; each of the K^T combinations is run
   through the block's decoder layers on cached block inputs and the one whose block output is
   closest to the unpruned block's wins (:func:`kt_search`).

Stage 2, low-rank experts: the kept experts get truncated-SVD factors with ranks from their
importance under a parameter budget (:mod:`eep.lowrank`), stored as a pruning gene's ``rank``.

Details the paper's abstract and secondary descriptions leave open, chosen here:
- an expert's importance is the loss of removing that expert alone: by default the reconstruction
  loss ‖Z − Z₋ₑ‖²_F of its layer's MoE output on the sampled calibration tokens
  (:func:`expert_importance`), or with ``importance: loss`` the increase of the model's
  next-token loss on the calibration texts (:func:`loss_importance`, one model pass per expert).
  For the reconstruction loss, ``reroute=False`` (default) drops its contribution and leaves the
  other experts' weights alone (Σ_t w_te² ‖y_te‖², so an expert whose output is zero has
  importance 0); ``reroute=True`` routes among the others as a pruning gene does (the tokens it
  served go to their next expert), the loss a pruned model really sees. A negative importance
  (removing the expert helps) counts as 0 when budgets are shared;
- a layer's importance is the sum of its experts';
- keep counts: every layer gets at least ``low`` (top-k) and at most ``high`` (E) experts; the
  rest of the budget is shared in proportion to layer importance (water-filling: a layer that
  would exceed ``high`` is capped and the remainder re-shared), rounded by largest remainder,
  ties to the lower layer index;
- the layer-wise search is EEP's steady-state loop with ``initial`` = population and
  ``evaluations`` = population x generations (no generation barrier), on a fitness in percent so
  that EEP's parent thresholds (3 and 1 points) keep their meaning; each layer has seed
  ``search.seed + layer``. With few experts (Mixtral: C(8, n) <= 70 keep sets) it enumerates the
  layer's space and stops when every child would repeat one;
- block inputs are the unpruned model's (as NAEE's layer-wise pruning); a block's score is the
  squared error of its last decoder layer's output over the non-padding calibration tokens; ties go
  to the combination of the earlier candidates;
- the two stages meet a size given in experts' worth of parameters (``search_space.keep`` x
  layers, or ``budget``): with ``rank_params`` = f, stage 1 keeps size / f experts and stage 2
  keeps the share size / kept of their parameters.
"""

from __future__ import annotations

import itertools
import math
import os
import socket
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch

from eep import calibration
from eep.calibration import (
    Calibration,
    calibration_batches,
    calibration_inputs,
    calibration_texts,
    keep_set_error,
    output_energy,
    output_error,
)
from eep.errors import EepError
from eep.genome import Genome


def expert_importance(cal: Calibration, reroute: bool = False) -> dict[int, torch.Tensor]:
    """[E] float64 per MoE layer: the loss of removing each expert alone (see the module)."""
    out = {}
    for layer in cal.moe_layers:
        if reroute:
            everyone = range(cal.num_experts)
            out[layer] = torch.tensor(
                [output_error(cal, layer, [x for x in everyone if x != e]) for e in everyone],
                dtype=torch.float64,
            )
        else:
            weights, index = cal.routing(
                layer, cal.logits[layer], list(range(cal.num_experts)), cal.top_k
            )
            dense = torch.zeros(cal.logits[layer].shape, dtype=torch.float64).scatter_(
                1, index, weights.double()
            )
            diagonal = torch.diagonal(cal.gram[layer].double(), dim1=1, dim2=2)  # ‖y_te‖² [N, E]
            out[layer] = (dense**2 * diagonal).sum(dim=0)
    return out


def next_token_loss(model, batches: Iterable[dict]) -> float:
    """Mean next-token cross-entropy over the non-padding positions of the batches."""
    from fitness.likelihood import next_token_nll

    total, count = 0.0, 0
    with torch.no_grad():
        for ids, mask in calibration_inputs(model, batches):
            nll = next_token_nll(
                model(input_ids=ids, attention_mask=mask, use_cache=False).logits, ids, mask
            )
            total += float(nll.double().sum())
            count += len(nll)
    if count == 0:
        raise EepError(
            "the calibration texts hold no next-token positions (all shorter than two tokens)"
        )
    return total / count


def loss_importance(
    model, adapter, batches: list[dict], log: Callable[[str], None] = lambda m: None
) -> dict[int, torch.Tensor]:
    """[E] float64 per MoE layer: the increase of the model's next-token loss on the calibration
    texts when that expert alone is removed (a pruning gene keeping the others; its tokens go to
    their next experts). One model pass over the texts per expert: E x layers passes in all."""
    base = next_token_loss(model, batches)
    out = {}
    for layer in adapter.moe_layers:
        log(f"[eep] loss importance: layer {layer}")
        losses = []
        for expert in range(adapter.num_experts):
            others = [e for e in range(adapter.num_experts) if e != expert]
            with adapter.applied(
                Genome.from_keep(adapter.num_experts, adapter.top_k, {layer: others})
            ):
                losses.append(next_token_loss(model, batches) - base)
        out[layer] = torch.tensor(losses, dtype=torch.float64)
    return out


def layer_keep_counts(
    importance: dict[int, torch.Tensor], budget: int, low: int, high: int
) -> dict[int, int]:
    """Experts each layer keeps, summing to ``budget``, each in ``low..high``, more for layers of
    higher importance (see the module for the rule)."""
    layers = sorted(importance)
    if not low * len(layers) <= budget <= high * len(layers):
        raise EepError(
            f"a budget of {budget} experts must lie in {low * len(layers)}..{high * len(layers)} for "
            f"{len(layers)} layers keeping {low}..{high} each"
        )
    weight = {i: max(float(importance[i].sum()), 0.0) for i in layers}
    share = {i: float(low) for i in layers}
    open_layers, left = set(layers), float(budget - low * len(layers))
    while left > 1e-9 and open_layers:
        total = sum(weight[i] for i in open_layers)
        portion = {
            i: left * (weight[i] / total if total > 0 else 1 / len(open_layers))
            for i in open_layers
        }
        left = 0.0
        for i in sorted(open_layers):
            room = high - share[i]
            given = min(portion[i], room)
            share[i] += given
            left += portion[i] - given
            if given >= room - 1e-12:
                open_layers.discard(i)
    counts = {i: math.floor(share[i] + 1e-9) for i in layers}
    spare = budget - sum(counts.values())
    by_remainder = sorted(
        (i for i in layers if counts[i] < high), key=lambda i: (-(share[i] - counts[i]), i)
    )
    for i in by_remainder[:spare]:
        counts[i] += 1
    return counts


# -- the plan -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Moei2Plan:
    """What a MoE-I² run keeps: ``target`` experts' worth of parameters in all MoE layers, reached
    by keeping ``stage1`` experts and (when ``stage1 > target``) low-rank factors holding
    ``target / stage1`` of their parameters."""

    num_experts: int
    top_k: int
    layers: tuple[int, ...]
    target: int
    stage1: int
    cfg: object  # Moei2Config

    @classmethod
    def of(cls, shape, target: int, cfg) -> Moei2Plan:
        """The plan reaching ``target`` experts' worth on a model of this shape (``cfg``: the
        ``moei2`` config section): stage 1 keeps target / rank_params experts, at most all."""
        layers = tuple(shape.moe_layers)
        stage1 = (
            target
            if cfg.rank_params is None
            else min(shape.num_experts * len(layers), round(target / cfg.rank_params))
        )
        return cls(shape.num_experts, shape.top_k, layers, target, stage1, cfg)

    @property
    def low_rank_fraction(self) -> float | None:
        return self.target / self.stage1 if self.cfg.rank_params is not None else None

    def size(self) -> int:
        from search_spaces import BudgetSpace

        return BudgetSpace(self.num_experts, self.top_k, self.layers, self.stage1).size()

    def describe(self) -> str:
        c = self.cfg
        stage2 = (
            f"; stage 2: low-rank experts keeping {self.low_rank_fraction:.3f} of their parameters"
            if self.low_rank_fraction is not None
            else ""
        )
        return (
            f"MoE-I²: stage 1 keeps {self.stage1} of {self.num_experts * len(self.layers)} experts by "
            f"{c.importance} importance, layer-wise search {c.population}x{c.generations}, K={c.candidates}, "
            f"T={c.block}{stage2}; size {self.target} experts' worth"
        )


def moei2_plan(config, shape) -> Moei2Plan:
    """Check a ``method: moei2`` config against the model's shape (no weights needed)."""
    from eep.families import FAMILIES

    family, space = FAMILIES[shape.family], config.search_space
    layers, e = tuple(shape.moe_layers), shape.num_experts
    if config.moei2.rank_params is not None and not family.gated_experts:
        raise EepError(
            f"MoE-I²'s stage 2 stores low-rank experts, which eep's custom form holds for gated experts "
            f"only; {family.title}'s have biases and their own activation: set moei2.rank_params: null"
        )
    if shape.expert_groups > 1:
        raise EepError(
            f"{family.title} routes within expert groups; MoE-I² does not support grouped routing"
        )
    if space.top_k is not None or space.groups is not None:
        raise EepError(
            "search_space.top_k and groups are EEP search settings; MoE-I² keeps the model's routing "
            "and searches layer by layer: remove them"
        )
    target = space.budget if space.budget is not None else space.keep * len(layers)
    if not shape.top_k * len(layers) <= target <= e * len(layers):
        raise EepError(
            f"MoE-I² size {target} experts must lie in {shape.top_k * len(layers)}..{e * len(layers)} "
            f"({len(layers)} layers, each keeping {shape.top_k}..{e})"
        )
    return Moei2Plan.of(shape, target, config.moei2)


# -- stage 1: layer-wise search -----------------------------------------------------------------


class LayerReconstruction:
    """A fitness worker for one layer's search: minus the percent of the layer's MoE-output
    energy (on the calibration sample) lost when only the genome's kept experts remain."""

    def __init__(self, cal: Calibration, layer: int):
        self.layer = layer
        self.error = keep_set_error(cal, layer)
        self.energy = output_energy(cal, layer)
        self.name = f"reconstruction@{socket.gethostname()}:{os.getpid()}"

    def __call__(self, candidate):
        from eep.journal import Evaluation

        start = time.perf_counter()
        lost = 100.0 * self.error(candidate.genome.keep(self.layer)) / max(self.energy, 1e-30)
        return Evaluation(
            candidate.id,
            candidate.genome,
            -lost,
            {"output_lost_pct": lost},
            time.perf_counter() - start,
            self.name,
        )


def layer_config(config, layer: int, keep: int):
    """The config of one layer's search, derived from the run's (so resuming re-derives it)."""
    from eep.config import parse_config

    c = config.moei2
    data = config.to_dict()
    data["name"] = f"{config.name}-layer{layer}"
    data["method"] = "eep"  # EEP's loop on a one-layer space (the digest of older runs' layers too)
    data["search_space"] = {"kind": "prune", "keep": keep}
    data["search"] = {
        **data["search"],
        "seed": config.search.seed + layer,
        "initial": c.population,
        "evaluations": c.population * c.generations,
        "in_flight": 1,
        "warm_start": [],  # MoE-I²'s genetic search starts from random keep sets
    }
    data["evaluator"] = {"kind": "serial"}
    return parse_config(data, source=f"layer {layer} search")


def layer_search(
    directory,
    config,
    cal: Calibration,
    layer: int,
    keep: int,
    log: Callable[[str], None],
    stop_after: int | None = None,
) -> tuple[list[Genome], int, int, bool]:
    """Run (or resume) one layer's search in ``directory``. Returns (its K best distinct keep sets
    as one-layer genomes, evaluations made by this call, evaluations in its journal, whether the
    search is finished)."""
    from eep.evaluator import SerialEvaluator
    from eep.journal import RunDir
    from eep.loop import run_search
    from search_spaces import PruneSpace

    sub_config = layer_config(config, layer, keep)
    run = (
        RunDir.open(directory)
        if (directory / "config.yaml").exists()
        else RunDir.create(directory, sub_config)
    )
    before = len(run.evaluations())
    space = PruneSpace(cal.num_experts, cal.top_k, (layer,), keep)
    with run.lock():
        run_search(
            run,
            space,
            SerialEvaluator(LayerReconstruction(cal, layer)),
            log=lambda m: log(m.replace("[eep] ", f"[eep] layer {layer}: ", 1)),
            stop_after=stop_after,
        )
    archive = run.evaluations()
    made = len(archive) - before
    finished = stop_after is None or made < stop_after
    ranked = sorted((e for e in archive if e.ok), key=lambda e: (-e.fitness, e.id))
    return [e.genome for e in ranked[: config.moei2.candidates]], made, len(archive), finished


# -- stage 1: the KT receptive field ------------------------------------------------------------


class BlockScorer:
    """Scores genomes on blocks of consecutive MoE layers: each block's decoder layers are run on
    their cached inputs (captured from one pass of the unpruned model) and compared with the
    unpruned block's output on the non-padding tokens."""

    def __init__(self, model, adapter, batches: Iterable[dict], blocks: list[list[int]]):
        from eep.moe import decoder_layers

        self.adapter, self.blocks = adapter, blocks
        self.layers = decoder_layers(model)
        spans = [range(block[0], block[-1] + 1) for block in blocks]
        wanted = {i for span in spans for i in span}
        starts = {span[0] for span in spans}
        self.batches: list[dict] = []
        current: dict = {}

        def capture(index: int):
            def hook(module, args, kwargs):
                hidden = args[0] if args else kwargs["hidden_states"]
                if index in starts:
                    current["inputs"][index] = hidden.detach()
                current["kwargs"][index] = {k: v for k, v in kwargs.items() if k != "hidden_states"}

            return hook

        handles = [
            self.layers[i].register_forward_pre_hook(capture(i), with_kwargs=True)
            for i in sorted(wanted)
        ]
        try:
            with torch.no_grad():
                for ids, mask in calibration_inputs(model, batches):
                    current = {"inputs": {}, "kwargs": {}, "valid": mask.bool()}
                    model(input_ids=ids, attention_mask=mask, use_cache=False)
                    self.batches.append(current)
        finally:
            for handle in handles:
                handle.remove()
        self.reference = [
            [self._run(b, batch) for batch in self.batches] for b in range(len(blocks))
        ]

    def _run(self, b: int, batch: dict) -> torch.Tensor:
        block = self.blocks[b]
        hidden = batch["inputs"][block[0]]
        for i in range(block[0], block[-1] + 1):
            out = self.layers[i](hidden, **batch["kwargs"][i])
            hidden = out[0] if isinstance(out, tuple) else out
        return hidden

    def error(self, b: int, genome: Genome) -> float:
        """‖H − H'‖²_F of block ``b``'s output with ``genome`` applied, over non-padding tokens."""
        total = 0.0
        with torch.no_grad(), self.adapter.applied(genome):
            for batch, reference in zip(self.batches, self.reference[b]):
                diff = (self._run(b, batch) - reference)[batch["valid"]]
                total += float(diff.double().pow(2).sum())
        return total


def blocks_of(layers: Iterable[int], size: int) -> list[list[int]]:
    """Consecutive blocks of ``size`` MoE layers (the last may be shorter)."""
    layers = list(layers)
    return [layers[i : i + size] for i in range(0, len(layers), size)]


def combine(genomes: Iterable[Genome]) -> Genome:
    """One genome holding the layer genes of several (each names different layers)."""
    genomes = list(genomes)
    genes = {i: gene for g in genomes for i, gene in g.layers}
    return Genome.from_genes(genomes[0].num_experts, genomes[0].top_k, genes)


def kt_search(
    scorer: BlockScorer, candidates: dict[int, list[Genome]]
) -> tuple[Genome, list[dict]]:
    """The best combination of the layers' candidates in every block of ``scorer`` (all K^T
    tried), joined into one genome; with each block's best error and the combinations tried."""
    chosen, report = [], []
    for b, block in enumerate(scorer.blocks):
        best = None
        tried = 0
        for combination in itertools.product(*(candidates[layer] for layer in block)):
            genome = combine(combination)
            error = scorer.error(b, genome)
            tried += 1
            if best is None or error < best[0]:
                best = (error, genome)
        chosen.append(best[1])
        report.append({"layers": block, "combinations": tried, "error": best[0]})
    return combine(chosen), report


# -- the run ------------------------------------------------------------------------------------


def compress(
    config,
    worker,
    directory,
    plan: Moei2Plan,
    log: Callable[[str], None],
    stop_after: int | None = None,
    cal: Calibration | None = None,
    batches: list[dict] | None = None,
) -> dict | None:
    """Both stages on ``worker``'s resident model; the layer searches live under ``directory``.
    Returns the stage results (genomes, keep counts, block errors), or None when ``stop_after``
    evaluations of the layer searches ended this call first (it resumes from their journals).
    ``cal``, ``batches``: the calibration statistics and tokenized texts when the caller has them
    (from the config's calibration texts)."""
    from pathlib import Path

    cfg, cal_cfg = config.moei2, config.baselines.calibration
    if batches is None:
        batches = calibration_batches(
            worker.tokenizer,
            calibration_texts(config),
            config.fitness.batch_size,
            cal_cfg.max_length,
        )
    if cal is None:
        log(f"[eep] MoE-I² calibration pass over {sum(len(b['input_ids']) for b in batches)} texts")
        cal = calibration.collect(
            worker.model, worker.adapter, batches, cal_cfg.max_tokens_per_layer, seed=cal_cfg.seed
        )
    if cfg.importance == "loss":
        importance = loss_importance(worker.model, worker.adapter, batches, log)
    else:
        importance = expert_importance(cal, reroute=cfg.importance == "reroute")
    counts = layer_keep_counts(importance, plan.stage1, plan.top_k, plan.num_experts)
    log(
        f"[eep] stage 1: {plan.stage1} experts kept, per layer "
        + " ".join(f"{counts[i]}" for i in plan.layers)
    )
    candidates, made, journaled = {}, 0, 0
    for layer in plan.layers:
        left = None if stop_after is None else stop_after - made
        if left == 0:
            return None
        best, new, total, finished = layer_search(
            Path(directory) / f"layer-{layer:02d}", config, cal, layer, counts[layer], log, left
        )
        made += new
        journaled += total
        if not finished:
            return None
        candidates[layer] = best
    log(
        f"[eep] stage 1: KT search over blocks of {cfg.block} layers, {cfg.candidates} candidates each"
    )
    scorer = BlockScorer(worker.model, worker.adapter, batches, blocks_of(plan.layers, cfg.block))
    stage1, blocks = kt_search(scorer, candidates)
    del scorer
    result = {
        "evaluations": journaled,
        "keep_counts": {str(i): counts[i] for i in plan.layers},
        "importance": {str(i): [round(float(x), 6) for x in importance[i]] for i in plan.layers},
        "blocks": blocks,
        "stage1": stage1,
        "stage2": None,
    }
    if plan.low_rank_fraction is not None:
        from eep.lowrank import allocate_ranks

        scales = None
        if cfg.factors == "activation":
            log("[eep] stage 2: activation scales of the kept experts' inputs")
            scales = calibration.collect_scales(worker.model, worker.adapter, batches)
        worker.adapter.use_scales(scales)
        result["scales"] = scales
        result["stage2"] = allocate_ranks(
            stage1, importance, worker.adapter, plan.low_rank_fraction, cfg.alpha
        )
    return result


def run_moei2(
    run, config, worker, plan: Moei2Plan, log: Callable[[str], None], stop_after: int | None = None
) -> dict | None:
    """A ``method: moei2`` run in ``run`` (a :class:`eep.journal.RunDir`): both stages,
    then the held-out scores of each stage's genome and of the full model into ``summary.json``
    (``best_genome`` is the last stage's, which ``eep export RUN_DIR`` writes). None when stopped."""
    from eep.surgery import parameter_counts
    from fitness.metrics import weighted_fitness

    result = compress(config, worker, run.path / "stage1", plan, log, stop_after)
    if result is None:
        return None
    log("[eep] scoring each stage's genome and the full model on the held-out split")

    def heldout(genome):
        scores = worker.scores(genome, "test")
        out = {"scores": scores, "mean": weighted_fitness(config.fitness.tasks, scores)}
        if genome is not None:
            out["kept_params"], out["active_params"] = parameter_counts(
                worker.model, worker.adapter, genome
            )
        return out

    if result.get("scales") is not None:  # what an activation-aware genome needs beside it
        from eep.lowrank import SCALES_FILE, save_scales

        save_scales(result["scales"], run.path / SCALES_FILE)
    stages = {name: result[name] for name in ("stage1", "stage2") if result[name] is not None}
    final = stages.get("stage2", stages["stage1"])
    summary = {
        "method": "moei2",
        "evaluations": result["evaluations"],
        "failed": 0,
        "best_fitness": None,
        "best_id": None,
        "best_scores": None,
        "best_genome": final.to_dict(),
        "keep_counts": result["keep_counts"],
        "importance": result["importance"],
        "blocks": result["blocks"],
        "stages": {
            name: {"genome": g.to_dict(), "heldout": heldout(g)} for name, g in stages.items()
        },
    }
    summary["heldout"] = {
        "best": summary["stages"]["stage2" if "stage2" in stages else "stage1"]["heldout"],
        "full": heldout(None),
    }
    run.write_summary(summary)
    return summary


# -- the method ---------------------------------------------------------------------------------


class Moei2:
    """``method: moei2``: MoE-I²'s two task-agnostic stages to the size the ``search_space`` names
    (:func:`moei2_plan`), resumable from the layer searches' journals; held-out scores of each
    stage's genome and of the full model at the end."""

    name = "moei2"
    searches = False
    """No EEP search: the stages' genomes are the run's rows of the comparison table."""

    def plan(self, config, shape, config_dir=None) -> Moei2Plan:
        if config.search.named_warm_start or config.search.seed_genomes:
            raise EepError(
                "search.warm_start and search.seed_genomes seed EEP's search; a MoE-I² run has no "
                "initial population"
            )
        if config.evaluator.kind == "ray":
            raise EepError(
                "MoE-I² scores its layer searches in this process on cached calibration statistics "
                "(each evaluation takes milliseconds); run it without --workers / --ray-address"
            )
        return moei2_plan(config, shape)

    def plan_lines(self, config, plan: Moei2Plan) -> list[tuple[str, str]]:
        m = config.moei2
        return [
            (
                "budget",
                f"up to {m.population * m.generations} evaluations per layer ({m.population} "
                f"random initial), seed {config.search.seed} + layer",
            )
        ]

    def start(self, config, run_dir, plan: Moei2Plan, log, config_dir=None) -> None:
        from eep.journal import RunDir

        run = RunDir.create(run_dir, config)
        run.write_request(config)
        with run.lock():
            self.resume(run, config, plan, log)

    def resume(self, run, config, plan: Moei2Plan, log, worker=None) -> dict:
        """Both stages (the layer searches resume from their journals), on ``worker`` if given."""
        import time

        from eep.evaluator import FitnessWorker

        start = time.perf_counter()
        if worker is None:
            log(f"[eep] loading {config.model.path}")
            worker = FitnessWorker(config)
        summary = run_moei2(run, config, worker, plan, log)
        stages = summary["stages"]
        log(
            f"[eep] done in {time.perf_counter() - start:.0f}s: "
            + "; ".join(
                f"{name} held-out {s['heldout']['mean']:.2f} "
                f"({s['heldout']['kept_params']:,} parameters)"
                for name, s in stages.items()
            )
            + f"; full model {summary['heldout']['full']['mean']:.2f}"
        )
        return summary

    def finished(self, summary: dict, config) -> bool:
        return "heldout" in summary

    def progress(self, summary: dict, config) -> tuple[int, int] | None:
        return None  # the layer searches stop when they converge: no planned total

    def outcome(self, summary: dict) -> dict:
        return {
            "evaluations": summary["evaluations"],
            **{name: round(s["heldout"]["mean"], 4) for name, s in summary["stages"].items()},
        }


METHOD = Moei2()
