"""Typed run configuration: YAML + ``key=value`` overrides, validated before anything is loaded.

Every section forbids unknown keys and checks types strictly, so a typo fails in one line
("config: search.evaluatons: unknown key ...") instead of silently running the defaults.
"""

from __future__ import annotations

import difflib
import hashlib
import json
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from eep.errors import EepError


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


PositiveInt = Annotated[int, Field(ge=1)]
Probability = Annotated[float, Field(ge=0.0, le=1.0)]


class ModelConfig(_Section):
    path: str = "toy"
    """A local Hugging Face model directory, a hub id, or ``toy`` for the embedded toy model."""
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    """``auto``: float32 on CPU, bfloat16 on GPU."""
    device: str = "auto"
    """``auto`` (GPU when available), ``cpu``, ``cuda`` or ``cuda:N``."""
    config_file: str | None = None
    """A local copy of the model's ``config.json``, read by ``--dry-run`` when the hub is offline."""
    experts_implementation: Literal["auto", "grouped_mm", "eager", "batched_mm"] = "auto"
    """How ``transformers`` computes the MoE experts; ``auto``: ``grouped_mm`` where torch supports
    it on the device, else ``eager`` (see :func:`eep.model.choose_experts`; ``batched_mm`` copies
    the selected experts' weights per token). Not part of the run's digest: the same math in another order."""


class SearchSpaceConfig(_Section):
    kind: Literal["prune", "merge"] = "prune"
    """``prune``: which experts each layer keeps. ``merge``: EEP's two phases in one run, pruning
    for ``merge_after`` evaluations, then merge + router matrices bred from the best pruned genomes.
    With ``method: moei2``, ``keep``/``budget`` is the size MoE-I² reaches, in experts' worth of
    parameters. (Older configs spelled that method ``kind: moei2``; they still load.)"""
    keep: PositiveInt | None = None
    """Experts kept in every MoE layer (default 4 unless ``budget`` is set)."""
    budget: PositiveInt | None = None
    """Instead of ``keep``: experts kept in all MoE layers together; the search spends it unevenly."""
    top_k: PositiveInt | None = None
    """Experts each token is routed to in every layer (e.g. 2 -> 1 for speed); default: the model's."""
    groups: PositiveInt | None = None
    """Consecutive-layer weight groups sharing one gene (EEP: 4 for Mixtral's 32 layers); default: one per layer."""
    merge_after: PositiveInt = 100
    """``kind: merge``: evaluations of pruning before merging starts (EEP: 100 of 400)."""

    @model_validator(mode="before")
    @classmethod
    def _default_keep(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("keep") is None and data.get("budget") is None:
            return {**data, "keep": 4}
        return data

    @model_validator(mode="after")
    def _one_budget(self):
        if self.keep is not None and self.budget is not None:
            raise ValueError(
                "set either keep (experts per layer) or budget (experts in all layers), not both"
            )
        if self.budget is not None and self.groups is not None:
            raise ValueError(
                "budget and groups cannot be combined: a budget spends experts layer by layer"
            )
        return self


SMALLEST_SHARE = 0.3
"""``search.smallest_after: auto``: the share of a kept-parameters frontier search's evaluations
bred at its smallest size, at the end."""


FRONTIER_KEEP = (
    "a multi-objective search (search.objectives) spans every size: remove search_space.keep"
)
"""Why a frontier config may not give ``search_space.keep`` (:class:`Config`, :func:`load_config`)."""


class SearchConfig(_Section):
    seed: int = 0
    evaluations: PositiveInt = 500
    """Total candidate evaluations, the initial population included. 500 cost about what 200 did when
    every answer was generated (teacher forcing, the early cut); with validation examples to pick the
    export by, they buy held-out accuracy where 200 tie greedy elimination (docs/search-quality.md)."""
    initial: PositiveInt = 30
    """Candidates before breeding starts (EEP: 30): greedy elimination's (a greedy warm start) and
    the seed genomes first, random genomes for the rest (none after a greedy start of 30 or more)."""
    seed_genomes: list[str] = []
    """Genome files evaluated first, in place of as many random initial ones (e.g. MoE-I²'s stage-1
    genome, or a baseline's): they must belong to the search space. ``eep search`` copies them into
    the run directory (``seeds/``) and names the copies here, so the run is self-contained."""
    warm_start: Literal["auto"] | list[Literal["greedy", "naee", "reap", "frequency"]] = "auto"
    """Start from the baselines' genomes, counted in ``evaluations``: ``greedy`` runs greedy elimination
    (``eep.greedy``) as the first candidates, journaled; ``naee``, ``reap``, ``frequency`` are computed
    from one calibration pass before the search and evaluated first, like ``seed_genomes``. ``auto``
    (the default): ``[greedy]`` where greedy elimination applies and takes at most 40 % of
    ``evaluations`` (``eep.greedy.AUTO_SHARE``), else ``[]``; a run stores what it resolved to.
    Measured on six toys at 2 and 3 of 8 (docs/search-quality.md): where the search alone stalls
    below greedy elimination it starts above it; elsewhere it changes little. On a frontier over
    kept experts ``naee``, ``reap``, ``frequency`` seed the upper half of the sizes
    (``eep.evolution.warm_keeps``; docs/frontier.md), and ``auto`` is ``[]``."""
    mutate_threshold: Annotated[float, Field(ge=0.0)] = 3.0
    """Mutation parents are drawn among candidates within this many points of the best (EEP: 3.0)."""
    crossover_threshold: Annotated[float, Field(ge=0.0)] = 1.0
    """Crossover parents are drawn among candidates within this many points of the best (EEP: 1.0)."""
    crossover_pool_min: Annotated[int, Field(ge=2)] = 6
    """...but never from fewer than this many of the best (EEP: 6)."""
    crossover_prob: Probability = 0.3
    """Probability that a child starts as a crossover of two parents (EEP: 0.3)."""
    layer_prob: Probability = 0.25
    """Probability that an operator touches a given layer; at least one layer is always touched (EEP: 0.25)."""
    swap_prob: Probability = 0.15
    """Probability that mutation swaps out a given kept expert of a touched layer (EEP: 0.15)."""
    move_prob: Probability = 0.5
    """Budget searches: probability that mutation moves one expert of budget between two layers."""
    noise_prob: Probability = 0.25
    """Merge phase: probability that mutation adds noise to an entry of a touched matrix (EEP: 0.25)."""
    noise_scale: Annotated[float, Field(gt=0.0)] = 0.065
    """Merge phase: standard deviation of that noise (EEP: 0.065)."""
    renorm_prob: Probability = 0.1
    """Merge phase: probability that a child's merge rows are re-normalised to sum to one (EEP: 0.1)."""
    max_breed_attempts: PositiveInt = 1000
    """Children that duplicate an evaluated genome are re-bred up to this many times."""
    max_failures: PositiveInt = 10
    """Evaluations failing in a row (each journaled with its reason) that stop the search with an
    error; `eep resume` continues it once the cause is fixed. Does not change the search's outcome."""
    early_cut: bool = True
    """Stop scoring a candidate once even perfect scores on its remaining generation examples could not
    make it a parent or the best (journaled as ``cut`` with that upper bound; other tasks are scored
    first, in full). The examples go in chunks of ``fitness.batch_size``, so it needs several chunks.
    Does not change the search's outcome: the same genomes in the same order, the same best."""
    select_top: PositiveInt = 30
    """With validation examples (``fitness.tasks[].validation_size``): the best candidates by search
    fitness among which (and the genomes the search started from: greedy elimination's result, the
    seed genomes) the one scoring best on them is exported. Not part of the run's digest.
    Among a search's best few, search fitness on a few examples a task barely tells the better
    keep sets from the lucky ones; a wide field judged on more validation examples does (toy, 2 and
    3 of 8, three seeds: held-out 88.62 with 30 judged on 64 examples a task, 88.27 with 5 on 16;
    toy-qwen, not tuned on: 90.53 vs 89.47, 85.5 vs 82.6 at 2 of 8)."""
    objectives: list[Literal["fitness", "kept_params", "active_params", "latency"]] = ["fitness"]
    """``[fitness]``: the best genome of one size. ``[fitness, kept_params]``: one search for the
    whole accuracy-size frontier: genomes of every size (each layer keeps top-k..E experts), parents
    chosen by NSGA-II rank and crowding from the archive, the non-dominated front kept, held-out
    scored and exportable point by point (the early cut stops a candidate only once enough no larger
    ones outscore it: ``eep.loop.front_bar``).
    ``[fitness, active_params]``: the same for parameters active per token: every expert kept, each
    layer routing to 1..top-k of them (the speed side of the trade-off).
    ``[fitness, latency]``: the same for the time a forward pass takes, measured on the worker for
    each candidate as a share of the full model's time taken beside it (``latency_repeats``), over
    genomes that choose both the experts each layer keeps and its top-k. Measured times vary with
    the machine and its load, so two runs of one config may differ; a run resumes exactly (the
    journal holds each measurement). No early cut: a candidate's latency is unknown until it is
    measured."""
    latency_repeats: PositiveInt = 5
    """``[fitness, latency]``: forward passes of one batch (``fitness.batch_size`` of the search
    prompts) timed per candidate, after one untimed; its latency is the fastest of them (whatever
    else runs on the machine only slows a pass: over 30 measurements of 5 passes on a 2-core CPU
    the fastest varied by 1.5–1.9 %, their median by 2.9 %)."""
    population: Annotated[int, Field(ge=4)] = 24
    """Multi-objective search: the parent pool NSGA-II selects from the archive for each child."""
    resize_prob: Probability = 0.15
    """Multi-objective search over kept parameters: the chance a mutation grows or shrinks a layer
    by one expert. Most children keep their parent's size, so each size is refined where it lies
    on the front (on the first toy 0.15 beat 0.5 and 0.05 at 2, 3 and 4 of 8 over three seeds)."""
    smallest_after: Annotated[int, Field(ge=0)] | Literal["auto"] | None = "auto"
    """Multi-objective search over kept parameters: from this evaluation on, children are bred at
    the smallest size only (top-k experts in every layer), as a single-size search does, from the
    candidates of that size the frontier found. The smallest size is the front's steepest end, and
    NSGA-II spreads its evaluations over every size (67 of 1000 went to it on toy-qwen). ``auto``:
    the last 30 % of ``evaluations`` (``SMALLEST_SHARE``; none when that would start before
    ``initial``); a run stores what it resolved to. None: every evaluation breeds on the whole
    front (as runs from before this setting did). The last 300 of 1000 evaluations took the pick
    at 2 of 8 from 1.1 points below a single-size search of 500 to 0.0 on toy, from 2.0 to 0.2 on
    toy-qwen (two seeds, 1000 test examples a task), and up by 0.8 to 6.2 points in four runs on
    two retrained toys never tuned on. Its cost is the front's last evaluations: on one of those
    runs the pick at 3 of 8, still improving at 700, fell 5.3 points (docs/frontier.md)."""
    in_flight: PositiveInt = 1
    """Candidates evaluated at once: candidate i is bred from the results of candidates 0..i-in_flight.
    The outcome depends on this, never on the evaluator, so a serial run with in_flight=N equals a
    Ray run with N actors. A new Ray search sets it to the number of actors unless the config does."""

    @property
    def frontier(self) -> bool:
        """A multi-objective search (more than one objective)."""
        return len(self.objectives) > 1

    @property
    def smallest_from(self) -> int | None:
        """The evaluation from which a frontier search breeds at its smallest size only
        (``smallest_after`` with ``auto`` resolved); None: never."""
        if self.smallest_after != "auto":
            return self.smallest_after
        if self.objectives != ["fitness", "kept_params"]:
            return None
        start = self.evaluations - round(SMALLEST_SHARE * self.evaluations)
        return start if start >= self.initial else None

    @property
    def named_warm_start(self) -> list[str]:
        """The warm starts the config names (``auto`` names none: it is resolved per search space)."""
        return [] if self.warm_start == "auto" else list(self.warm_start)

    @model_validator(mode="after")
    def _initial_within_budget(self):
        if self.objectives not in (
            ["fitness"],
            ["fitness", "kept_params"],
            ["fitness", "active_params"],
            ["fitness", "latency"],
        ):
            raise ValueError(
                f"objectives {self.objectives} must be one of [fitness], [fitness, kept_params], "
                "[fitness, active_params] or [fitness, latency] (fitness first)"
            )
        if self.initial > self.evaluations:
            raise ValueError(
                f"initial ({self.initial}) must not exceed evaluations ({self.evaluations})"
            )
        if self.smallest_after not in ("auto", None):
            if self.objectives != ["fitness", "kept_params"]:
                raise ValueError(
                    "smallest_after applies to a search over kept parameters (objectives: "
                    "[fitness, kept_params]); remove it"
                )
            if not self.initial <= self.smallest_after < self.evaluations:
                raise ValueError(
                    f"smallest_after ({self.smallest_after}) must be at least initial "
                    f"({self.initial}) and below evaluations ({self.evaluations})"
                )
        if len(self.seed_genomes) + len(set(self.named_warm_start) - {"greedy"}) > self.initial:
            raise ValueError(
                f"{len(self.seed_genomes)} seed_genomes and warm_start {self.warm_start} but initial is "
                f"{self.initial}; seeds take the place of initial random genomes"
            )
        return self


MetricName = Literal[
    "exact_match",
    "contains",
    "first_capital",
    "f1",
    "choice",
    "choice_norm",
    "perplexity",
    "esap",
    "kl",
    "reconstruction",
]


AUTO_VALIDATION = 64
"""Validation examples a task gets by default. Picking the export among the 30 best by search fitness
on 64 of them a task beat exporting the best search fitness on both toys and on a new user's config
of the second toy (32 search examples a task, 500 evaluations: 96.94 against 94.94 held out at 3 of
8, where greedy elimination scores 95.25; see docs/search-quality.md)."""


class TaskConfig(_Section):
    """One scored task. ``preset`` (see ``fitness.presets``) fills in the rest for common benchmarks."""

    name: str
    dataset: str | None = None
    """``toy:<task>`` (see ``fitness.toy_tasks.TASKS``), a ``datasets`` hub id, a local directory of
    split files, or ONE local json/jsonl/csv/parquet file (its rows split by a content hash: 30 % held
    out, the rest searched). Or, instead, ``data_files``."""
    data_files: dict[str, str] | None = None
    """Local files as they lie, per split: ``{search: data/rev_train.jsonl, test: data/rev_heldout.jsonl}``
    (paths or globs; json/jsonl/csv/parquet); ``search_split`` / ``test_split`` name its keys."""
    subset: str | None = None
    """The dataset's configuration name, if it has several."""
    prompt: str | None = None
    """Template over the example's fields, e.g. ``"{context}\nQ: {question}\nA:"``; for ``text`` metrics
    (perplexity, esap, kl, reconstruction) the whole text, e.g. ``"{text}"``. Not for toy tasks."""
    answer: str | None = None
    """Field of the reference answer (dotted for nested fields, a list means any-of); for ``choice``
    metrics the label: an option index, or one of ``choice_labels``."""
    answer_map: dict[str, str] | None = None
    """Maps answer values to text, e.g. ``{"true": "yes", "false": "no"}`` (or to option indices)."""
    choices: str | list[str] | None = None
    """``choice`` metrics: a field holding the list of options (``choices.text``), or a list of option
    templates (``["{sol1}", "{sol2}"]``, or literal ``["no", "yes"]``)."""
    choice_labels: str | None = None
    """Field listing the options' labels (e.g. ARC's ``choices.label``) when the answer is a label."""
    target_delimiter: str = " "
    """Put between the prompt and each option (or the ``continuation``)."""
    continuation: str | None = None
    """``choice`` metrics where options complete the prompt at different places (WinoGrande): each option
    replaces ``{choice}`` in the prompt, and this fixed template is the continuation scored."""
    preprocess: str | None = None
    """A named row transform from ``fitness.presets.PREPROCESS`` (e.g. ``hellaswag``, ``winogrande``)."""
    preset: str | None = None
    """A ready task from ``fitness.presets.PRESETS``; keys given here override the preset's."""
    metric: MetricName = "exact_match"
    stop: list[str] | None = None
    """Generation: completions are cut at the first of these strings before scoring."""
    chat_template: bool = False
    """Wrap each prompt in the tokenizer's chat template (as one user turn) before scoring."""
    search_split: str = "search"
    """Split scored during the search (the fitness)."""
    test_split: str = "test"
    """Held-out split reported for the best genome and the export; never optimised."""
    search_size: PositiveInt = 32
    validation_size: Annotated[int, Field(ge=0)] | Literal["auto"] = "auto"
    """Examples drawn from the search split's source after the search ones (disjoint from both the
    search and the test examples), never searched on: the exported genome is picked among the search's
    best by them (``search.select_top``). ``auto``: :data:`AUTO_VALIDATION`, or what the source has
    left after the search ones (none left: the task has no validation examples). 0: none, and
    without any the best search fitness is exported."""
    test_size: PositiveInt = 100
    seed: int = 0
    weight: Annotated[float, Field(gt=0.0)] = 1.0

    @model_validator(mode="after")
    def _one_source(self):
        if (self.dataset is None) == (self.data_files is None):
            raise ValueError("give either dataset or data_files")
        return self

    @field_validator("answer_map", mode="before")
    @classmethod
    def _option_indices(cls, value: Any) -> Any:
        # {A: 0} maps a label to an option index: written as a number, meant as "0" (booleans are
        # left to fail: YAML reads an unquoted yes / no / true as one, which is never meant)
        if isinstance(value, dict):
            return {
                k: str(v) if isinstance(v, int) and not isinstance(v, bool) else v
                for k, v in value.items()
            }
        return value

    @model_validator(mode="before")
    @classmethod
    def _unset_validation(cls, data: Any) -> Any:
        # runs written before ``auto`` stored ``null`` for "no validation examples"
        if isinstance(data, dict) and "validation_size" in data and data["validation_size"] is None:
            return {**data, "validation_size": 0}
        return data

    @property
    def validation_count(self) -> int:
        """Validation examples asked for (``auto``: :data:`AUTO_VALIDATION`, fewer where the source
        runs out)."""
        return AUTO_VALIDATION if self.validation_size == "auto" else self.validation_size

    @model_validator(mode="before")
    @classmethod
    def _apply_preset(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("preset") is not None:
            from fitness.presets import preset_fields

            return {**preset_fields(data["preset"]), **data}
        return data


class FitnessConfig(_Section):
    tasks: Annotated[list[TaskConfig], Field(min_length=1)]
    batch_size: PositiveInt = 32
    max_new_tokens: PositiveInt = 16
    max_length: PositiveInt = 2048
    """Longest input in tokens for likelihood and text metrics (longer inputs lose their start)."""
    scoring: Literal["auto", "generate"] = "auto"
    """``auto``: ``exact_match`` examples are scored by one teacher-forced forward pass wherever that
    gives generation's verdict (see ``fitness.teacher_forcing``), the rest generated; ``generate``:
    every example by greedy generation (the reference, e.g. to check the other with ``eep eval``).
    Not part of the run's digest: both give the same verdicts up to floating-point ties."""

    @property
    def validates(self) -> bool:
        """Some task asks for validation examples: the export is picked by them (where the tasks'
        sources have any left), and the early cut spares the ``search.select_top`` best."""
        return any(t.validation_count for t in self.tasks)

    @model_validator(mode="after")
    def _unique_names(self):
        names = [t.name for t in self.tasks]
        if len(names) != len(set(names)):
            raise ValueError(f"task names must be unique, got {names}")
        return self


class Moei2Config(_Section):
    """``method: moei2`` (arXiv 2411.01016) and the ``moei2`` baseline: stage 1 spends
    an expert budget unevenly over layers by importance and picks each layer's experts by a
    layer-wise genetic search on reconstruction loss, combined across blocks of layers; stage 2
    gives the kept experts low-rank factors. Calibration texts: ``baselines.calibration``."""

    importance: Literal["drop", "reroute", "loss"] = "drop"
    """An expert's importance, the loss of removing it alone: the MoE-output reconstruction loss when
    its weighted output is dropped (``drop``) or its tokens go to their next experts (``reroute``), or
    the increase of the model's next-token loss on the calibration texts (``loss``: E x layers passes)."""
    rank_params: Annotated[float, Field(gt=0.0, le=1.0)] | None = None
    """Stage 2: the fraction of the stage-1 experts' parameters the low-rank factors keep; stage 1 then
    keeps ``search_space`` size / rank_params experts so both stages together reach that size. Unset:
    stage 1 only."""
    factors: Literal["svd", "activation"] = "svd"
    """Stage 2: plain truncated SVD of each matrix, or activation-aware (scaled by the calibration
    activations' per-channel RMS, see ``eep.lowrank``)."""
    alpha: Annotated[float, Field(ge=0.0)] = 0.15
    """Stage 2: ranks in a layer follow (importance + eps)^alpha (MoE-I²: 0.15; 0 gives every expert one rank)."""
    population: PositiveInt = 100
    """Layer-wise search: random keep sets before breeding (MoE-I²: population 100)."""
    generations: PositiveInt = 50
    """Layer-wise search: population x generations evaluations per layer (MoE-I²: 50)."""
    candidates: PositiveInt = 3
    """K: best distinct keep sets each layer's search passes on (MoE-I²: 3)."""
    block: PositiveInt = 3
    """T: consecutive MoE layers whose K^T combinations are scored together (MoE-I²: 3)."""


BaselineName = Literal["random", "frequency", "naee", "naee+skip", "reap", "moei2", "greedy"]


class CalibrationConfig(_Section):
    """Texts the baselines' routing statistics and NAEE's reconstruction are computed on."""

    dataset: str | None = None
    """A ``datasets`` hub id, local directory or file of texts (e.g. ``allenai/c4``); unset: the fitness
    tasks' search examples written out in full (task-specific calibration, as in NAEE's task-specific mode)."""
    subset: str | None = None
    split: str = "train"
    prompt: str = "{text}"
    """Template forming one text from a row."""
    size: PositiveInt = 128
    """Texts used (NAEE: 128 sequences of C4)."""
    max_length: PositiveInt = 2048
    max_tokens_per_layer: PositiveInt = 65536
    """MoE-block inputs kept per layer for NAEE's subset enumeration (a seeded sample of all tokens)."""
    seed: int = 0


class BaselinesConfig(_Section):
    """``eep baselines``: what the search is compared against."""

    methods: list[BaselineName] = ["random", "frequency", "naee", "naee+skip", "reap", "greedy"]
    """``greedy``: backward elimination with the real fitness on the search split (``eep.greedy``); the
    only baseline that pays in evaluations, shown next to its row."""
    random_draws: PositiveInt = 5
    sweep: list[PositiveInt] = []
    """Further experts-per-layer counts at which the baselines are also scored (for the report's plot)."""
    naee_max_subsets: PositiveInt = 20000
    """NAEE enumerates every keep set of a layer up to this many, else falls back to greedy elimination."""
    calibration: CalibrationConfig = CalibrationConfig()


class EvaluatorConfig(_Section):
    """How candidates are evaluated. Never changes a search's outcome, so it may change on resume."""

    kind: Literal["serial", "ray"] = "serial"
    workers: PositiveInt | None = None
    """Ray: number of actors (default: one per GPU block of the cluster, else one per CPU)."""
    address: str | None = None
    """Ray: cluster to join (``auto`` or host:port); unset starts a local Ray runtime."""
    gpus_per_actor: PositiveInt = 1
    """Ray: GPUs each actor holds (a model larger than one GPU is spread over them)."""


METHODS = ("eep", "moei2")


class Config(_Section):
    name: str
    method: Literal["eep", "moei2"] = "eep"
    """How the run compresses: ``eep``, EEP's evolutionary search over the ``search_space``; or
    ``moei2``, MoE-I²'s task-agnostic two stages (the ``moei2`` section) to the size the
    ``search_space`` names (:mod:`eep.methods`)."""
    model: ModelConfig = ModelConfig()
    search_space: SearchSpaceConfig = SearchSpaceConfig()
    search: SearchConfig = SearchConfig()
    fitness: FitnessConfig
    evaluator: EvaluatorConfig = EvaluatorConfig()
    baselines: BaselinesConfig = BaselinesConfig()
    moei2: Moei2Config = Moei2Config()

    @model_validator(mode="before")
    @classmethod
    def _old_method_spelling(cls, data):
        """``search_space.kind: moei2`` (run directories written before ``method``) is ``method: moei2``."""
        space = data.get("search_space") if isinstance(data, dict) else None
        if isinstance(space, dict) and space.get("kind") == "moei2":
            if data.get("method", "moei2") != "moei2":
                raise ValueError("search_space.kind: moei2 is method: moei2; drop one of them")
            data = {**data, "method": "moei2", "search_space": {**space, "kind": "prune"}}
        return data

    @model_validator(mode="after")
    def _frontier_has_no_size(self):
        # keep defaults to 4, which a multi-objective search ignores; another value is a mistake
        if self.search.frontier and self.search_space.keep not in (None, 4):
            raise ValueError(FRONTIER_KEEP)
        return self

    @model_validator(mode="after")
    def _moei2_prunes(self):
        if self.method == "moei2" and self.search_space.kind != "prune":
            raise ValueError(
                "method: moei2 keeps experts (search_space.kind: prune); it does not merge"
            )
        return self

    @model_validator(mode="after")
    def _merge_after_initial(self):
        space, search = self.search_space, self.search
        if space.kind == "merge" and not search.initial <= space.merge_after < search.evaluations:
            raise ValueError(
                f"search_space.merge_after ({space.merge_after}) must be at least search.initial "
                f"({search.initial}) and below search.evaluations ({search.evaluations})"
            )
        return self

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")

    def outcome(self) -> dict:
        """Everything that decides the search's outcome (the evaluator, the baselines, when to give up
        on failures, the early cut, the scoring path and the experts kernel do not), as plain data."""
        data = {k: v for k, v in self.to_dict().items() if k not in ("evaluator", "baselines")}
        data["model"] = {k: v for k, v in data["model"].items() if k != "experts_implementation"}
        # written as runs before the ``method`` key were, so that their digests hold
        del data["method"]
        if self.method != "moei2":
            del data["moei2"]  # only decides MoE-I² runs
        else:  # MoE-I² is decided by its calibration texts
            data["search_space"]["kind"] = "moei2"
            data["calibration"] = self.baselines.calibration.model_dump(mode="json")
        data["search"] = {
            k: v
            for k, v in data["search"].items()
            if k not in ("max_failures", "early_cut", "select_top")
        }
        data["fitness"] = {k: v for k, v in data["fitness"].items() if k != "scoring"}
        for task in data["fitness"]["tasks"]:
            task.pop("validation_size")  # decides only which genome is exported, after the search
            if task["data_files"] is None:
                del task["data_files"]  # added with a neutral default
        for key in ("seed_genomes", "warm_start", "smallest_after"):
            if not data["search"][key]:
                # keys added with a neutral default keep older runs' digests
                del data["search"][key]
        if not self.search.frontier:  # added with neutral defaults: these decide nothing then
            for key in ("objectives", "population", "resize_prob", "smallest_after"):
                data["search"].pop(key, None)
        if "latency" not in self.search.objectives:  # measured for a latency frontier only
            data["search"].pop("latency_repeats", None)
        return data

    def digest(self) -> str:
        """Hash of :meth:`outcome`: two configs with the same digest run the same search."""
        return hashlib.sha256(json.dumps(self.outcome(), sort_keys=True).encode()).hexdigest()[:16]


def differences(before: Any, after: Any, prefix: str = "", limit: int = 4) -> str:
    """``key: old -> new`` for the first ``limit`` dotted keys where two config dicts differ."""
    found: list[str] = []

    def walk(a, b, path):
        if isinstance(a, dict) and isinstance(b, dict):
            for key in sorted(set(a) | set(b), key=str):
                walk(
                    a.get(key, "<unset>"),
                    b.get(key, "<unset>"),
                    f"{path}.{key}" if path else str(key),
                )
        elif isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
            for i, (x, y) in enumerate(zip(a, b)):
                walk(x, y, f"{path}.{i}")
        elif a != b:
            found.append(f"{path}: {a!r} -> {b!r}")

    walk(before, after, prefix)
    more = f" (and {len(found) - limit} more)" if len(found) > limit else ""
    return "; ".join(found[:limit]) + more


def load_config(path: str | Path, overrides: list[str] = ()) -> Config:
    """Read a YAML config, apply ``a.b=value`` overrides (values parsed as YAML), validate."""
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise EepError(f"config file {path} does not exist") from None
    except yaml.YAMLError as err:
        raise EepError(
            f"config file {path} is not valid YAML: {' '.join(str(err).split())}"
        ) from None
    if not isinstance(data, dict):
        raise EepError(
            f"config file {path} must hold a mapping of sections (model, search, fitness, ...)"
        )
    for item in overrides:
        apply_override(data, item)
    source = str(path)
    _check_frontier_keep(data, source, overrides)
    if overrides:  # a bad value may come from either: name the --set one when it was overridden
        try:
            return parse_config(data, source=source)
        except EepError as err:
            key = str(err).removeprefix(f"{source}: ").split(":")[0]
            if any(_within(key, o.partition("=")[0].strip()) for o in overrides):
                raise EepError(f"--set {str(err).removeprefix(f'{source}: ')}") from None
            raise
    return parse_config(data, source=source)


def _check_frontier_keep(data: dict, source: str, overrides) -> None:
    """A multi-objective search spans every size, so a ``search_space.keep`` the user wrote is a
    mistake, even the value 4 that :class:`Config` cannot tell from the default it fills in (stored
    run configs carry that default, so this checks what was written, before it is parsed)."""
    space, search = data.get("search_space"), data.get("search")
    objectives = search.get("objectives") if isinstance(search, dict) else None
    if not (isinstance(objectives, list) and len(objectives) > 1):
        return
    if not isinstance(space, dict) or space.get("keep") is None:
        return
    written = [o for o in overrides if _within("search_space.keep", o.partition("=")[0].strip())]
    written = written or [o for o in overrides if o.partition("=")[0].strip() == "search_space"]
    where = f"--set {written[-1].strip()}" if written else f"{source}: search_space.keep"
    raise EepError(f"{where}: {FRONTIER_KEEP}")


def _within(key: str, override: str) -> bool:
    """Whether config key ``key`` is ``override``'s key or inside it (``a.b.c`` is within ``a.b``)."""
    return key == override or key.startswith(override + ".")


def parse_config(data: Any, source: str = "config") -> Config:
    try:
        return Config.model_validate(data)
    except ValidationError as err:
        raise EepError(f"{source}: {_first_error(err)}") from None


def apply_override(data: dict, item: str) -> None:
    """Set ``a.b.0.c=value`` in the raw config (numbers index lists; missing sections are created)."""
    key, sep, raw = item.partition("=")
    if not sep or not key.strip():
        raise EepError(f"override {item!r} must look like section.key=value")
    try:
        value = yaml.safe_load(raw)
    except yaml.YAMLError:  # e.g. a template, "{context} Q: {question}": the text as it is
        value = raw
    if isinstance(value, dict) and value and all(v is None for v in value.values()):
        value = raw  # "{question}" reads as a YAML mapping with no values: it is a template
    *parents, leaf = key.strip().split(".")
    node: Any = data
    for part in parents:
        node = _child(node, part, item)
    if isinstance(node, list):
        node[_index(node, leaf, item)] = value
    elif isinstance(node, dict):
        node[leaf] = value
    else:
        raise EepError(f"override {item!r}: cannot set {leaf!r} inside a plain value")


def _child(node: Any, part: str, item: str) -> Any:
    if isinstance(node, list):
        return node[_index(node, part, item)]
    if not isinstance(node, dict):
        raise EepError(f"override {item!r}: cannot set {part!r} inside a plain value")
    if node.get(part) is None:
        node[part] = {}
    return node[part]


def _index(node: list, part: str, item: str) -> int:
    if not part.isdigit() or int(part) >= len(node):
        raise EepError(f"override {item!r}: {part!r} is not an index of a {len(node)}-item list")
    return int(part)


def _first_error(err: ValidationError) -> str:
    errors = err.errors()
    # a misspelt key also leaves the key it meant missing: the misspelling is the one to name
    first = next((e for e in errors if e["type"] == "extra_forbidden"), errors[0])
    where = ".".join(str(p) for p in first["loc"]) or "config"
    if first.get("input", "") is None and first["type"] in ("model_type", "dict_type"):
        field = Config.model_fields.get(str(first["loc"][0])) if len(first["loc"]) == 1 else None
        needed = field is not None and field.is_required()
        return f"{where}: the section is empty; give its keys" + ("" if needed else " or remove it")
    if first["type"] == "extra_forbidden":
        allowed = _allowed_keys(first["loc"][:-1])
        close = difflib.get_close_matches(str(first["loc"][-1]), allowed, n=1)
        hint = f"did you mean {close[0]!r}? " if close else ""
        return f"{where}: unknown key; {hint}allowed here: {', '.join(allowed)}"
    if first["type"] == "missing":
        return f"{where}: required key is missing"
    message = first["msg"].removeprefix("Value error, ")
    got = first.get("input")
    if not first["loc"]:  # a check across sections: its message names the keys
        return message
    return f"{where}: {message}" + ("" if isinstance(got, dict) else f" (got {got!r})")


def _allowed_keys(loc: tuple) -> list[str]:
    model: Any = Config
    for part in loc:
        if isinstance(part, int):
            continue
        annotation = model.model_fields[part].annotation
        model = getattr(annotation, "__args__", (annotation,))[0] if part == "tasks" else annotation
    return list(model.model_fields)
