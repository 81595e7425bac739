"""``eep bench``: what a search costs and what its product buys, measured in one run on this machine.

1. **apply**: applying + restoring a prune genome and a merge genome (every layer merged anew) in
   place, as a fraction of one candidate evaluation (goal <= 2 %);
2. **rebuild**: candidate evaluations/s of eep's evaluator against EEP's reference way on the same
   genomes and data — the original weights kept on CPU, and per candidate: slice / merge the
   experts there, copy every weight into a freshly built model (``load_state_dict``), evaluate.
   Both must give the same scores (checked); the ratio is the speedup (goal >= 10x);
3. **search**: a short search: children bred again because they were already evaluated, and
   genomes evaluated twice (goal 0);
4. **ray**: evaluations/s of the same search on 1 and 2 Ray actors and their busy fraction (with one
   candidate per actor, and with two queued per actor, ``in_flight`` = 2 x actors);
5. **export**: the full model against its 4-of-8 export and its 4-of-8 top-1 export: parameters,
   bytes on disk, peak memory and tokens/s of greedy generation at batch 1 and 32, each model
   measured in a fresh process;
6. **scoring**: one evaluation teacher-forced against the same one generated (same hits checked),
   its tokens/s against plain ``generate`` on the same batch, and the roofline: a decode step's time
   against reading every weight once at the memory bandwidth a device copy reaches in this run, and
   one evaluation's against the longer of its forward calls' weight reads and its FLOPs (2 per
   active parameter and token position fed) at the matmul throughput measured in this run;
7. **early cut**: the same search at a quarter of the experts with and without the cut (same
   genomes and best checked): the share of the evaluations' time (and of the search's wall time)
   the cut saves.

Every row frees what the rows before it held (models, rebuilt copies, the GPU allocator's cache),
so a wide model's later rows start from the memory of one resident model.

Times are medians of ``repeats`` runs with half their range as spread; ratios come from one run.
Candidates are scored on the toy tasks' search split (8 tasks x 16 prompts, greedy, 8 new tokens),
whatever the model: on a random model the accuracy is meaningless and the compute is real.
"""

from __future__ import annotations

import copy
import json
import os
import platform
import random
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

from eep.errors import EepError

NEW_TOKENS = (
    16  # generated per prompt in the tokens/s rows (the toy's prompts + 16 fit its 32 positions)
)
GOALS = {
    "apply_fraction_prune": ("<=", 0.02),
    "apply_fraction_merge": ("<=", 0.02),
    "speedup_vs_rebuild": (">=", 10.0),
    "reevaluations": ("<=", 0),
    "busy_fraction": (">=", 0.95),
    "tf_speedup": (">=", 5.0),
    "cut_saved_fraction": (">=", 0.30),
    "roofline_ratio": ("<=", 3.0),
}

RANDOM_SIZES = {
    # ~25M parameters: 8 layers, hidden 256
    "random-mixtral": dict(
        hidden_size=256,
        intermediate_size=512,
        num_hidden_layers=8,
        num_attention_heads=8,
        num_key_value_heads=4,
    ),
    # ~100M parameters: 8 layers, hidden 512
    "random-100m": dict(
        hidden_size=512,
        intermediate_size=960,
        num_hidden_layers=8,
        num_attention_heads=8,
        num_key_value_heads=4,
    ),
    # ~180M parameters: wide, shallow experts (hidden 1024, intermediate 3584), 2 layers
    "random-wide": dict(
        hidden_size=1024,
        intermediate_size=3584,
        num_hidden_layers=2,
        num_attention_heads=8,
        num_key_value_heads=4,
    ),
    # Mixtral-8x7B's layer shape (1.4 B parameters a layer), few layers: `--layers`, default 2
    "random-mixtral-width": dict(
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=2,
        num_attention_heads=32,
        num_key_value_heads=8,
    ),
}
WIDE = "random-mixtral-width"


def random_mixtral(
    path: Path, name: str = "random-mixtral", layers: int | None = None, device: str = "cpu"
) -> str:
    """A randomly initialised Mixtral with the toy's tokenizer saved to ``path``: its accuracy is
    meaningless, its compute and memory per candidate are real. The wide one is built and saved in
    bfloat16 (11 GiB in float32 at two layers), on ``device`` (a GPU initialises it in seconds)."""
    from transformers import AutoTokenizer, MixtralConfig, MixtralForCausalLM

    from eep.toy import TOY_DIR

    tokenizer = AutoTokenizer.from_pretrained(TOY_DIR)
    sizes = {**RANDOM_SIZES[name], **({"num_hidden_layers": layers} if layers else {})}
    config = MixtralConfig(
        vocab_size=len(tokenizer),
        num_local_experts=8,
        num_experts_per_tok=2,
        max_position_embeddings=64,
        bos_token_id=2,
        eos_token_id=3,
        pad_token_id=0,
        **sizes,
    )
    torch.manual_seed(0)
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16 if name == WIDE else torch.float32)
    try:
        with torch.device(device):
            model = MixtralForCausalLM(config)
    finally:
        torch.set_default_dtype(default)
    with torch.no_grad():  # default init routes almost uniformly; sharper routing is more realistic
        for layer in model.model.layers:
            layer.mlp.gate.weight.normal_(0, 0.5)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


def median_spread(fn: Callable[[], object], repeats: int) -> tuple[float, float]:
    """(median seconds, half the range) of ``repeats`` calls of ``fn``."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), (max(times) - min(times)) / 2


@torch.no_grad()
def greedy(model, tokenizer, ids, new_tokens: int) -> None:
    """Greedy generation of exactly ``new_tokens`` per prompt of the batch ``ids``, finished on
    its device."""
    model.generate(
        **ids,
        max_new_tokens=new_tokens,
        min_new_tokens=new_tokens,
        do_sample=False,
        pad_token_id=tokenizer.pad_token_id,
    )
    _sync(ids["input_ids"].device)


def decode_step(model, tokenizer, ids, new_tokens: int, repeats: int) -> tuple[float, float]:
    """(seconds of one greedy decode step, seconds to generate ``new_tokens``) over the batch
    ``ids``, medians after a warm-up: a step is the time of ``new_tokens`` tokens less that of one,
    over the ``new_tokens - 1`` steps between them."""
    greedy(model, tokenizer, ids, new_tokens)  # warm-up
    full, _ = median_spread(lambda: greedy(model, tokenizer, ids, new_tokens), repeats)
    one, _ = median_spread(lambda: greedy(model, tokenizer, ids, 1), repeats)
    return max(full - one, 1e-9) / (new_tokens - 1), full


def _config(model: str, device: str, batch_size: int = 128, **extra):
    from eep.config import parse_config
    from fitness import toy_tasks

    return parse_config(
        {
            "name": "bench",
            "model": {"path": model, "device": device},
            "fitness": {
                "batch_size": batch_size,
                "max_new_tokens": 8,
                # no validation examples: the rows time evaluations, and the cut row's bar is then
                # the parent pools' alone (with them, the 30 best the export is picked from are
                # never cut either)
                "tasks": [
                    {"name": t, "dataset": f"toy:{t}", "search_size": 16, "validation_size": 0}
                    for t in toy_tasks.TASKS
                ],
            },
            **extra,
        }
    )


def _free(device: torch.device) -> None:
    """Return what earlier rows held: Python garbage, then the GPU allocator's cached blocks."""
    import gc

    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def half_kept(adapter):
    """The pruning space every row measures at: half the experts (at least top-k) in every MoE layer."""
    from search_spaces import PruneSpace

    keep = max(adapter.top_k, adapter.num_experts // 2)
    return PruneSpace(adapter.num_experts, adapter.top_k, tuple(adapter.moe_layers), keep)


# -- 1. apply ------------------------------------------------------------------------------------


def bench_apply(worker, repeats: int, log) -> dict:
    from search_spaces import MergeSpace, layer_groups, mutate_noise, random_genome

    adapter = worker.adapter
    layers, device = tuple(adapter.moe_layers), adapter.routers[adapter.moe_layers[0]].weight.device
    rng = random.Random(0)
    pruned = random_genome(half_kept(adapter), rng)
    space = MergeSpace(adapter.num_experts, adapter.top_k, layer_groups(layers, None))
    merged, other = (mutate_noise(pruned, rng, space, 1.0, 0.25, 0.065, 0.0) for _ in range(2))
    worker.scores(pruned)  # warm-up
    rows = {}
    for name, genomes in (("prune", (pruned,)), ("merge", (merged, other))):
        turn = iter(range(10**9))

        def apply(genomes=genomes, turn=turn):
            with adapter.applied(genomes[next(turn) % len(genomes)]):
                pass
            _sync(device)

        apply_s, apply_spread = median_spread(apply, repeats * 4)
        eval_s, eval_spread = median_spread(
            lambda g=genomes[0]: (worker.scores(g), _sync(device)), repeats
        )
        rows[name] = {
            "apply_s": apply_s,
            "apply_spread_s": apply_spread,
            "evaluation_s": eval_s,
            "evaluation_spread_s": eval_spread,
            "fraction": apply_s / eval_s,
        }
        log(
            f"[bench] apply {name}: {1e3 * apply_s:.2f} ms of a {eval_s:.3f} s evaluation "
            f"= {100 * apply_s / eval_s:.2f} %"
        )
    return rows


# -- 2. rebuild per candidate (EEP's reference way) --------------------------------------------


class Rebuild:
    """Scores genomes the way EEP's released code does: the original weights stay on CPU; per
    candidate the experts are sliced / merged there, every weight is copied into a freshly built
    model (``load_state_dict``) on the device, and that model is evaluated."""

    def __init__(self, worker):
        from eep.moe import MoEAdapter

        self.worker = worker
        self.device = next(worker.model.parameters()).device
        with torch.no_grad():
            self.cpu_adapter = MoEAdapter(copy.deepcopy(worker.model).to("cpu"))

    def scores(self, genome) -> dict[str, float]:
        from eep.moe import moe_blocks
        from eep.surgery import assemble, compress

        small, _ = compress(self.cpu_adapter, genome)  # slice / merge on CPU
        state = {k: v.to(self.device, copy=True) for k, v in small.state_dict().items()}
        model = assemble(type(small), small.config, state, small, self.device)
        return self.worker.scorers["search"](model, moe_blocks(model))


def bench_rebuild(worker, genomes: int, log) -> dict:
    from search_spaces import random_genome

    rng, space = random.Random(1), half_kept(worker.adapter)
    sample = [random_genome(space, rng) for _ in range(genomes)]
    rebuild = Rebuild(worker)
    device = rebuild.device
    worker.scores(sample[0]), rebuild.scores(sample[0])  # warm-up both
    timed = {}
    for name, score in (("eep", worker.scores), ("rebuild", rebuild.scores)):
        start = time.perf_counter()
        results = [score(g) for g in sample]
        _sync(device)
        timed[name] = (time.perf_counter() - start, results)
    if timed["eep"][1] != timed["rebuild"][1]:
        raise EepError(
            "the rebuilt models scored differently from eep's in-place genomes; the comparison is void"
        )
    rate = {name: genomes / seconds for name, (seconds, _) in timed.items()}
    log(
        f"[bench] {genomes} candidates: eep {rate['eep']:.2f} evals/s, rebuild per candidate "
        f"{rate['rebuild']:.2f} evals/s (same scores) -> {rate['eep'] / rate['rebuild']:.2f}x"
    )
    return {
        "genomes": genomes,
        "eep_evals_per_s": rate["eep"],
        "rebuild_evals_per_s": rate["rebuild"],
        "speedup": rate["eep"] / rate["rebuild"],
    }


# -- 3 / 4. search: duplicates, Ray scaling ----------------------------------------------------


def bench_search(
    model: str,
    device: str,
    evaluations: int,
    actors: tuple[tuple[int, int], ...],
    scratch: Path,
    log,
) -> dict:
    """The same search serially and on Ray with each ``(actors, candidates queued per actor)``."""
    from eep.evaluator import FitnessWorker, SerialEvaluator
    from eep.journal import RunDir
    from eep.loop import run_search
    from eep.model import load_hf_config
    from eep.moe import shape_of
    from search_spaces import build_schedule

    rows = {}
    for workers, depth in ((0, 1), *actors):
        extra = {
            "search": {
                "seed": 0,
                "evaluations": evaluations,
                "initial": min(10, evaluations),
                "in_flight": max(workers, 1) * depth,
            },
            "search_space": {"kind": "prune", "keep": 4},
        }
        if workers:
            extra["evaluator"] = {"kind": "ray", "workers": workers}
        config = _config(model, device, **extra)
        run = RunDir.create(scratch / f"search-{workers}-{depth}", config)
        if workers:
            from eep.ray_evaluator import RayEvaluator

            evaluator = RayEvaluator(config, log=lambda m: None)
        else:
            evaluator = SerialEvaluator(FitnessWorker(config))
        stats: dict = {}
        try:
            space = build_schedule(config.search_space, shape_of(load_hf_config(config.model)))
            start = time.perf_counter()
            summary = run_search(run, space, evaluator, log=lambda m: None, stats=stats)
            seconds = time.perf_counter() - start
            busy = evaluator.busy_fraction(steady=True) if workers else None
        finally:
            evaluator.close()
        keys = [e.genome.key for e in run.evaluations()]
        label = (
            f"ray, {workers} actor{'s' if workers > 1 else ''}"
            + (f", {depth} queued each" if depth > 1 else "")
            if workers
            else "serial"
        )
        rows[label] = {
            "evaluations": len(keys),
            "evals_per_s": len(keys) / seconds,
            "busy_fraction": busy,
            "rebred": stats["rebred"],
            "reevaluations": len(keys) - len(set(keys)),
            "best_fitness": summary["best_fitness"],
        }
        log(
            f"[bench] search, {label}: {len(keys) / seconds:.2f} evals/s"
            + (f", actors busy {100 * busy:.1f} %" if busy is not None else "")
            + f"; {stats['rebred']} duplicate children bred again, {rows[label]['reevaluations']} re-evaluated"
        )
    return rows


# -- 5. export --------------------------------------------------------------------------------


def _generation(
    path: str, device: str, batches: tuple[int, ...], new_tokens: int, repeats: int
) -> dict:
    """In a fresh process: load ``path``, greedy-generate exactly ``new_tokens`` for each batch
    size; tokens/s (median) and peak memory (GPU: allocated; CPU: the process's peak RSS)."""
    from eep.config import ModelConfig
    from eep.model import load_model
    from fitness import toy_tasks

    model, tokenizer = load_model(ModelConfig(path=path, device=device))  # fp32 on CPU, bf16 on GPU
    dev = model.device
    prompts = [e.prompt for t in toy_tasks.TASKS for e in toy_tasks.examples(t, "test", 8)]
    out = {"parameters": sum(p.numel() for p in model.parameters()), "tokens_per_s": {}}
    for batch in batches:
        ids = tokenizer(prompts[:batch], return_tensors="pt", padding=True).to(dev)
        greedy(model, tokenizer, ids, new_tokens)  # warm-up
        seconds, spread = median_spread(
            lambda ids=ids: greedy(model, tokenizer, ids, new_tokens), repeats
        )
        out["tokens_per_s"][str(batch)] = {
            "median": batch * new_tokens / seconds,
            "spread": batch * new_tokens * spread / seconds**2,
        }
    out["peak_memory_bytes"] = (
        torch.cuda.max_memory_allocated(dev) if dev.type == "cuda" else _peak_rss()
    )
    return out


def _peak_rss() -> int:
    """This process's peak resident memory since it started its program: Linux's VmHWM, which,
    unlike ``ru_maxrss``, does not carry over the parent's high-water mark through fork + exec."""
    import resource

    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def bench_export(worker, device: str, scratch: Path, repeats: int, log) -> dict:
    import multiprocessing

    from eep.genome import Genome
    from eep.surgery import compress
    from search_spaces import random_genome

    adapter, tokenizer = worker.adapter, worker.tokenizer
    space = half_kept(adapter)
    keep = space.keep
    pruned = random_genome(space, random.Random(2))
    variants = {
        "full": None,
        f"keep {keep} of {adapter.num_experts}": pruned,
        f"keep {keep} of {adapter.num_experts}, top-1": Genome.from_keep(
            adapter.num_experts, adapter.top_k, pruned.keep_map(), active=1
        ),
    }
    rows = {}
    context = multiprocessing.get_context("spawn")
    for name, genome in variants.items():
        path = scratch / f"export-{len(rows)}"
        model = worker.model if genome is None else compress(adapter, genome)[0]
        model.save_pretrained(path)
        tokenizer.save_pretrained(path)
        with context.Pool(1) as pool:
            row = pool.apply(_generation, (str(path), device, (1, 32), NEW_TOKENS, repeats))
        row["disk_bytes"] = sum(
            f.stat().st_size for f in path.iterdir() if f.suffix == ".safetensors"
        )
        rows[name] = row
        log(
            f"[bench] {name}: {row['parameters']:,} parameters, {row['disk_bytes'] / 2**20:.1f} MiB, "
            f"{row['tokens_per_s']['1']['median']:.0f} / {row['tokens_per_s']['32']['median']:.0f} tokens/s "
            f"at batch 1 / 32, peak {row['peak_memory_bytes'] / 2**20:.0f} MiB"
        )
    full = rows["full"]["tokens_per_s"]
    for row in rows.values():
        row["speedup"] = {b: row["tokens_per_s"][b]["median"] / full[b]["median"] for b in full}
    return rows


# -- 6. scoring: teacher forcing, tokens/s, roofline ---------------------------------------------


def _bandwidth(device: torch.device, nbytes: int = 2**28) -> float:
    """Bytes/s a device-to-device copy reaches (each byte read once and written once)."""
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device).fill_(1.0)
    dst = torch.empty_like(src)
    dst.copy_(src), _sync(device)
    seconds, _ = median_spread(lambda: (dst.copy_(src), _sync(device)), 5)
    return 2 * nbytes / seconds


def _scaled(value: float, unit: str, base: int = 1000) -> str:
    """``5.8e9, "B", 1024`` -> ``5.41 GiB``; ``3.4e12, "FLOP"`` -> ``3.40 TFLOP``: toy and wide
    models in one format."""
    prefixes = ("", "K", "M", "G", "T", "P")
    step = 0
    while abs(value) >= base and step < len(prefixes) - 1:
        value, step = value / base, step + 1
    infix = "i" if base == 1024 and step else ""
    return f"{value:.2f} {prefixes[step]}{infix}{unit}"


def _matmul_flops(device: torch.device, dtype: torch.dtype) -> float:
    """FLOP/s a large square matmul reaches in ``dtype``: the compute roof of a forward pass."""
    n = 8192 if device.type == "cuda" else 1024
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    (a @ b), _sync(device)
    seconds, _ = median_spread(lambda: ((a @ b), _sync(device)), 5)
    return 2 * n**3 / seconds


def active_params(model, adapter) -> int:
    """Parameters one token's forward pass multiplies by: all but the embeddings and the output
    head (looked up / applied at few positions), with each MoE layer's experts at top-k of E."""
    heads = (model.get_input_embeddings(), model.get_output_embeddings())
    skip = {id(p) for m in heads if m is not None for p in m.parameters()}
    experts = {
        id(p)
        for block in adapter.blocks.values()
        for p in getattr(block, "experts", block).parameters()
    }
    share = adapter.top_k / adapter.num_experts
    return int(
        sum(
            p.numel() * (share if id(p) in experts else 1)
            for p in model.parameters()
            if id(p) not in skip
        )
    )


def forward_work(model, run) -> tuple[int, int]:
    """(forward calls, token positions fed) while ``run()`` runs: what an evaluation computes."""
    seen = [0, 0]

    def count(module, args, kwargs):
        ids = kwargs.get("input_ids", args[0] if args else None)
        seen[0] += 1
        seen[1] += 0 if ids is None else ids.numel()

    handle = model.register_forward_pre_hook(count, with_kwargs=True)
    try:
        run()
    finally:
        handle.remove()
    return seen[0], seen[1]


def bench_scoring(worker, genomes: int, repeats: int, log) -> dict:
    """Teacher-forced vs generated scoring of the same genomes; tokens/s against ``generate``; roofline."""
    from fitness.scoring import Scorer
    from fitness.teacher_forcing import teacher_forced
    from search_spaces import random_genome

    adapter, model, tokenizer, fit = (
        worker.adapter,
        worker.model,
        worker.tokenizer,
        worker.config.fitness,
    )
    device = next(model.parameters()).device
    scorers = {
        path: Scorer(
            model,
            tokenizer,
            worker.scorers["search"].tasks,
            fit.batch_size,
            fit.max_new_tokens,
            fit.max_length,
            scoring=path,
        )
        for path in ("auto", "generate")
    }
    rng = random.Random(3)
    sample = [random_genome(half_kept(adapter), rng) for _ in range(genomes)]
    timed, hits = {}, {}
    for path, scorer in scorers.items():

        def score_all(scorer=scorer, path=path):
            hits[path] = []
            for genome in sample:
                with adapter.applied(genome):
                    hits[path].append(scorer.example_scores())
            _sync(device)

        score_all()  # warm-up
        timed[path] = median_spread(score_all, repeats)[0] / genomes
    differ = sum(
        a != b
        for x, y in zip(hits["auto"], hits["generate"])
        for t in x
        for a, b in zip(x[t], y[t])
    )
    forced = scorers["auto"]
    items = [i for t in forced.items.values() for i in t if i is not None]
    decided = 0  # (example, genome) pairs the forward pass decides; the rest are generated
    for genome in sample:
        with adapter.applied(genome):
            verdicts = teacher_forced(model, tokenizer, items, fit.max_new_tokens)
        decided += sum(v is not None for v in verdicts)
    tf_tokens = sum(len(i.prompt) + len(i.rows[0]) for i in items)
    prompts = [p for t in forced.prompts.values() for p in t]

    batch = prompts[: fit.batch_size]
    ids = tokenizer(batch, return_tensors="pt", padding=True, padding_side="left").to(device)
    step_s, gen_s = decode_step(model, tokenizer, ids, fit.max_new_tokens, repeats)
    gen_tokens = ids["attention_mask"].sum().item() + len(batch) * fit.max_new_tokens
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    bandwidth = _bandwidth(device)
    roofline_s = weight_bytes / bandwidth
    # one evaluation's own roofline: every forward call reads the weights once, and every token
    # position fed costs 2 FLOPs per active parameter at the matmul peak measured here
    work = {"auto": [0, 0], "generate": [0, 0]}  # per path: forward calls, token positions
    for genome in sample:
        with adapter.applied(genome):
            for path, scorer in scorers.items():
                c, t = forward_work(model, scorer.example_scores)
                work[path][0] += c / genomes
                work[path][1] += t / genomes
    calls, tokens = work["auto"]
    per_token = 2 * active_params(model, adapter)  # FLOPs a token position costs
    flops = per_token * tokens
    peak = _matmul_flops(device, next(model.parameters()).dtype)
    eval_roofline_s = max(calls * roofline_s, flops / peak)
    row = {
        "genomes": genomes,
        "teacher_forced_s": timed["auto"],
        "generated_s": timed["generate"],
        "tf_speedup": timed["generate"] / timed["auto"],
        "examples_differing": differ,
        "examples": sum(len(t) for t in forced.prompts.values()),
        "forced_examples": len(items),
        "decided_examples": decided,
        "eval_tokens_per_s": tf_tokens / timed["auto"],
        "generate_tokens_per_s": gen_tokens / gen_s,
        "generate_batch": min(len(prompts), fit.batch_size),
        "decode_step_s": step_s,
        "weight_bytes": weight_bytes,
        "bandwidth_bytes_per_s": bandwidth,
        "roofline_step_s": roofline_s,
        "roofline_ratio": step_s / roofline_s,
        "forward_passes": calls,
        "forward_tokens": tokens,
        # where compute, not the per-call overhead, bounds both paths (a CPU, a large batch), the
        # teacher-forced path can be at most this much cheaper: it feeds prompt + answer where
        # generation computes prompt + completion
        "generated_forward_passes": work["generate"][0],
        "generated_forward_tokens": work["generate"][1],
        "compute_bound_speedup": work["generate"][1] / tokens if tokens else None,
        "evaluation_flops": flops,
        "matmul_flops_per_s": peak,
        "evaluation_roofline_s": eval_roofline_s,
        "evaluation_roofline_ratio": timed["auto"] / eval_roofline_s,
    }
    log(
        f"[bench] scoring: teacher-forced {timed['auto']:.3f} s vs generated {timed['generate']:.3f} s per evaluation "
        f"= {row['tf_speedup']:.2f}x ({differ} of {row['examples']} x {genomes} example verdicts differ; "
        f"{decided} of {len(items)} x {genomes} decided by the forward pass, the rest generated); "
        f"{row['eval_tokens_per_s']:.0f} evaluation tokens/s vs {row['generate_tokens_per_s']:.0f} of generate; "
        f"token positions computed {tokens:.0f} in {calls:.1f} forward calls vs {work['generate'][1]:.0f} in "
        f"{work['generate'][0]:.1f}: at most {row['compute_bound_speedup']:.2f}x where compute bounds both"
    )
    log(
        f"[bench] roofline: decode step {1e3 * step_s:.2f} ms vs {1e3 * roofline_s:.2f} ms to read "
        f"{_scaled(weight_bytes, 'B', 1024)} at {bandwidth / 1e9:.0f} GB/s = {row['roofline_ratio']:.1f}x; an evaluation "
        f"{1e3 * timed['auto']:.2f} ms vs {1e3 * eval_roofline_s:.2f} ms = {row['evaluation_roofline_ratio']:.1f}x "
        f"its roofline ({calls:.1f} forward calls reading the weights, {tokens:.0f} token positions x "
        f"{_scaled(per_token, 'FLOP')} at {_scaled(peak, 'FLOP/s')})"
    )
    return row


# -- 7. early cut ----------------------------------------------------------------------------------


def bench_cut(model: str, device: str, evaluations: int, scratch: Path, log) -> dict:
    """The same search at a quarter of the experts, cut and uncut: the share of time saved. The two
    alternate twice and each keeps its faster time, so a burst of load on a shared machine does not
    decide the ratio."""
    from eep.evaluator import FitnessWorker, SerialEvaluator
    from eep.journal import RunDir
    from eep.loop import run_search
    from eep.model import load_hf_config
    from eep.moe import shape_of
    from search_spaces import build_schedule

    shape = None
    timed = {True: float("inf"), False: float("inf")}  # wall time of the search
    # the evaluations' own time (journaled), the search's bookkeeping left out
    scoring = dict(timed)
    results, worker = {}, None
    for turn, cut in enumerate((True, False, True, False)):
        extra = {
            "search": {
                "seed": 0,
                "evaluations": evaluations,
                "initial": min(30, evaluations // 2),
                "early_cut": cut,
            }
        }
        config = _config(model, device, batch_size=32, **extra)
        shape = shape or shape_of(load_hf_config(config.model))
        keep = max(shape.top_k, shape.num_experts // 4)
        config = config.model_copy(
            update={"search_space": config.search_space.model_copy(update={"keep": keep})}
        )
        worker = worker or FitnessWorker(config)  # one resident model serves both runs
        run = RunDir.create(scratch / f"cut-{turn}", config)
        space = build_schedule(config.search_space, shape)
        start = time.perf_counter()
        results[cut] = run_search(run, space, SerialEvaluator(worker), log=lambda m: None)
        timed[cut] = min(timed[cut], time.perf_counter() - start)
        records = run.evaluations()
        scoring[cut] = min(scoring[cut], sum(e.seconds for e in records))
        results[cut]["keys"] = [e.genome.key for e in records]
    if (
        results[True]["keys"] != results[False]["keys"]
        or results[True]["best_genome"] != results[False]["best_genome"]
    ):
        raise EepError(
            "the search with the early cut differs from the one without; the comparison is void"
        )
    row = {
        "keep": keep,
        "evaluations": evaluations,
        "cut": results[True]["cut"],
        "cut_s": timed[True],
        "uncut_s": timed[False],
        "wall_saved_fraction": 1 - timed[True] / timed[False],
        "cut_scoring_s": scoring[True],
        "uncut_scoring_s": scoring[False],
        "saved_fraction": 1 - scoring[True] / scoring[False],
    }
    log(
        f"[bench] early cut at keep {keep} of {shape.num_experts}: {row['cut']} of {evaluations} candidates cut; "
        f"evaluation time {scoring[True]:.1f} s vs {scoring[False]:.1f} s = {100 * row['saved_fraction']:.0f} % saved, "
        f"search {timed[True]:.1f} s vs {timed[False]:.1f} s = {100 * row['wall_saved_fraction']:.0f} % (same search)"
    )
    return row


# -- the command ------------------------------------------------------------------------------


def run_bench(
    model: str = "toy",
    out: str | Path = "bench",
    device: str = "auto",
    repeats: int = 5,
    evaluations: int = 40,
    rebuild_genomes: int = 8,
    ray: bool = True,
    export: bool = True,
    layers: int | None = None,
    cut_evaluations: int = 200,
    log: Callable[[str], None] = print,
) -> dict:
    """Run every measurement on ``model`` (``toy``, ``random-mixtral``, ``random-100m``,
    ``random-mixtral-width`` with ``layers``, or a path) and write ``bench.json`` and ``bench.md`` to ``out``."""
    from eep.evaluator import FitnessWorker
    from eep.journal import check_creatable
    from eep.model import pick_device

    if repeats < 1 or evaluations < 2 or cut_evaluations < 2:
        raise EepError(
            "--repeats must be at least 1, --evaluations and --cut-evaluations at least 2"
        )
    if layers is not None and layers < 1:
        raise EepError("--layers must be at least 1")
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise EepError(f"--out {out} is a file; give a directory")
    check_creatable(out / "bench.json", "the benchmark output")
    dev = pick_device(device)
    with torch.no_grad(), tempfile.TemporaryDirectory(prefix="eep-bench-") as tmp:
        scratch = Path(tmp)
        if layers is not None and model != WIDE:
            raise EepError(f"--layers is for --model {WIDE}")
        build = str(dev) if model == WIDE else "cpu"  # the small ones stay as the CPU draws them
        path = (
            random_mixtral(scratch / "model", model, layers, build)
            if model in RANDOM_SIZES
            else model
        )
        worker = FitnessWorker(_config(path, str(dev)))
        params = sum(p.numel() for p in worker.model.parameters())
        implementation = getattr(worker.model.config, "_experts_implementation", None)
        log(
            f"[bench] {model}: {params / 1e6:.1f} M parameters on {dev}, experts kernel {implementation}; "
            f"medians of {repeats}"
        )
        result = {
            "model": model,
            "parameters": params,
            "device": str(dev),
            "machine": machine(dev),
            "repeats": repeats,
            "experts_implementation": implementation,
        }
        result["apply"] = bench_apply(worker, repeats, log)
        _free(dev)
        result["scoring"] = bench_scoring(worker, min(rebuild_genomes, 4), repeats, log)
        _free(dev)
        result["rebuild"] = bench_rebuild(worker, rebuild_genomes, log)
        _free(dev)
        result["export"] = bench_export(worker, str(dev), scratch, repeats, log) if export else {}
        del worker
        _free(dev)
        result["cut"] = bench_cut(path, str(dev), cut_evaluations, scratch, log)
        _free(dev)
        actors = ((1, 1), (2, 1), (2, 2)) if ray else ()
        result["search"] = bench_search(path, str(dev), evaluations, actors, scratch, log)
    search = result["search"]
    result.update(
        apply_fraction_prune=result["apply"]["prune"]["fraction"],
        apply_fraction_merge=result["apply"]["merge"]["fraction"],
        speedup_vs_rebuild=result["rebuild"]["speedup"],
        reevaluations=search["serial"]["reevaluations"],
        busy_fraction=search["ray, 2 actors, 2 queued each"]["busy_fraction"] if ray else None,
        export_speedup={
            name: row["speedup"] for name, row in result["export"].items() if name != "full"
        },
        tf_speedup=result["scoring"]["tf_speedup"],
        cut_saved_fraction=result["cut"]["saved_fraction"],
        roofline_ratio=result["scoring"]["roofline_ratio"] if dev.type == "cuda" else None,
    )
    result["goals"] = {
        key: _meets(result[key], *goal) for key, goal in GOALS.items() if result[key] is not None
    }
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench.json").write_text(json.dumps(result, indent=1) + "\n")
    (out / "bench.md").write_text(markdown(result))
    log(markdown(result))
    return result


def _meets(value: float, op: str, goal: float) -> bool:
    return value <= goal if op == "<=" else value >= goal


def machine(device: torch.device) -> str:
    what = f"{platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}"
    if device.type == "cuda":
        what = f"{torch.cuda.get_device_name(device)}, " + what
    return what


def markdown(r: dict) -> str:
    def pct(x):
        return f"{100 * x:.2f} %"

    def goal(key):
        op, value = GOALS[key]
        met = r["goals"].get(key)
        shown = pct(value) if "fraction" in key else f"{value:g}"
        return f"{op} {shown} " + ("(met)" if met else "(not met)" if met is not None else "")

    lines = [
        f"# eep bench: {r['model']} ({r['parameters'] / 1e6:.1f} M parameters) on {r['device']}, "
        f"experts kernel {r['experts_implementation']}",
        "",
        f"Machine: {r['machine']}. Medians of {r['repeats']} runs ± half their range; ratios from one run.",
        "",
        "| measure | value | goal |",
        "|---|---|---|",
    ]
    for name in ("prune", "merge"):
        a = r["apply"][name]
        lines.append(
            f"| apply + restore a {name} genome / one evaluation | {1e3 * a['apply_s']:.2f} ms / "
            f"{a['evaluation_s']:.3f} s = {pct(a['fraction'])} | {goal('apply_fraction_' + name)} |"
        )
    rb = r["rebuild"]
    lines.append(
        f"| evals/s: eep in place vs rebuild per candidate ({rb['genomes']} genomes, same scores) | "
        f"{rb['eep_evals_per_s']:.2f} vs {rb['rebuild_evals_per_s']:.2f} = {rb['speedup']:.2f}x | "
        f"{goal('speedup_vs_rebuild')} |"
    )
    sc, cut = r["scoring"], r["cut"]
    lines.append(
        f"| one evaluation: teacher-forced vs generated ({sc['forced_examples']} of {sc['examples']} examples "
        f"forced, {sc.get('decided_examples', '?')} of {sc['forced_examples']} x {sc['genomes']} decided by the "
        f"forward pass; "
        f"{sc['examples_differing']} verdicts differ) | {sc['teacher_forced_s']:.3f} s vs "
        f"{sc['generated_s']:.3f} s = {sc['tf_speedup']:.2f}x | {goal('tf_speedup')} |"
    )
    if sc.get("compute_bound_speedup"):
        lines.append(
            f"| token positions computed per evaluation: teacher-forced vs generated "
            f"({sc['forward_passes']:.1f} vs {sc['generated_forward_passes']:.1f} forward calls) | "
            f"{sc['forward_tokens']:.0f} vs {sc['generated_forward_tokens']:.0f}: at most "
            f"{sc['compute_bound_speedup']:.2f}x where compute bounds both | |"
        )
    lines.append(
        f"| early cut, search of {cut['evaluations']} at keep {cut['keep']} ({cut['cut']} cut, same search): "
        f"evaluation time | {cut['cut_scoring_s']:.1f} s vs {cut['uncut_scoring_s']:.1f} s = "
        f"{pct(cut['saved_fraction'])} saved | {goal('cut_saved_fraction')} |"
    )
    lines.append(
        f"| early cut: the whole search's wall time | {cut['cut_s']:.1f} s vs {cut['uncut_s']:.1f} s = "
        f"{pct(cut['wall_saved_fraction'])} saved | |"
    )
    lines.append(
        f"| tokens/s: evaluation vs plain generate (batch {sc['generate_batch']}) | "
        f"{sc['eval_tokens_per_s']:.0f} vs {sc['generate_tokens_per_s']:.0f} | |"
    )
    lines.append(
        f"| decode step vs roofline ({_scaled(sc['weight_bytes'], 'B', 1024)} at "
        f"{sc['bandwidth_bytes_per_s'] / 1e9:.0f} GB/s copy bandwidth) | {1e3 * sc['decode_step_s']:.2f} ms vs "
        f"{1e3 * sc['roofline_step_s']:.2f} ms = {sc['roofline_ratio']:.1f}x | {goal('roofline_ratio')} |"
    )
    lines.append(
        f"| one teacher-forced evaluation vs its roofline (the longer of {sc['forward_passes']:.1f} weight "
        f"reads and {_scaled(sc['evaluation_flops'], 'FLOP')} at {_scaled(sc['matmul_flops_per_s'], 'FLOP/s')}) | "
        f"{1e3 * sc['teacher_forced_s']:.2f} ms vs {1e3 * sc['evaluation_roofline_s']:.2f} ms = "
        f"{sc['evaluation_roofline_ratio']:.1f}x | |"
    )
    serial = r["search"]["serial"]
    lines.append(
        f"| search of {serial['evaluations']}: duplicate children bred again / genomes re-evaluated | "
        f"{serial['rebred']} / {serial['reevaluations']} | re-evaluated {goal('reevaluations')} |"
    )
    lines += ["", "| evaluator | evals/s | vs serial | actors busy |", "|---|---|---|---|"]
    for label, row in r["search"].items():
        busy = "" if row["busy_fraction"] is None else pct(row["busy_fraction"])
        lines.append(
            f"| {label} | {row['evals_per_s']:.2f} | {row['evals_per_s'] / serial['evals_per_s']:.2f}x | {busy} |"
        )
    if r["busy_fraction"] is not None:
        lines.append(
            f"\nSteady-state busy fraction of 2 actors holding 2 candidates each: {pct(r['busy_fraction'])}, "
            f"goal {goal('busy_fraction')} (with one each: "
            f"{pct(r['search']['ray, 2 actors']['busy_fraction'])}; actor-measured evaluation time)."
        )
    if not r["export"]:
        return "\n".join(lines) + "\n"
    lines += [
        "",
        "| model | parameters | on disk | peak memory | tokens/s, batch 1 | tokens/s, batch 32 |",
        "|---|---|---|---|---|---|",
    ]
    for name, row in r["export"].items():
        tps = row["tokens_per_s"]
        cells = [
            f"{tps[b]['median']:.0f} ± {tps[b]['spread']:.0f} ({row['speedup'][b]:.2f}x)"
            for b in ("1", "32")
        ]
        lines.append(
            f"| {name} | {row['parameters']:,} | {row['disk_bytes'] / 2**20:.1f} MiB | "
            f"{row['peak_memory_bytes'] / 2**20:.0f} MiB | {cells[0]} | {cells[1]} |"
        )
    return "\n".join(lines) + "\n"


__all__ = ["Rebuild", "random_mixtral", "run_bench"]
