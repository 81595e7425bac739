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
   measured in a fresh process.

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

NEW_TOKENS = 16  # generated per prompt in the tokens/s rows (the toy's prompts + 16 fit its 32 positions)
GOALS = {"apply_fraction_prune": ("<=", 0.02), "apply_fraction_merge": ("<=", 0.02),
         "speedup_vs_rebuild": (">=", 10.0), "reevaluations": ("<=", 0), "busy_fraction": (">=", 0.95)}

RANDOM_SIZES = {
    # ~25M parameters: 8 layers, hidden 256
    "random-mixtral": dict(hidden_size=256, intermediate_size=512, num_hidden_layers=8,
                           num_attention_heads=8, num_key_value_heads=4),
    # ~100M parameters: 8 layers, hidden 512
    "random-100m": dict(hidden_size=512, intermediate_size=960, num_hidden_layers=8,
                        num_attention_heads=8, num_key_value_heads=4),
    # ~180M parameters: Mixtral-wide experts (hidden 1024, intermediate 3584), 2 layers
    "random-wide": dict(hidden_size=1024, intermediate_size=3584, num_hidden_layers=2,
                        num_attention_heads=8, num_key_value_heads=4),
}


def random_mixtral(path: Path, name: str = "random-mixtral") -> str:
    """A randomly initialised Mixtral with the toy's tokenizer saved to ``path``: its accuracy is
    meaningless, its compute and memory per candidate are real."""
    from transformers import AutoTokenizer, MixtralConfig, MixtralForCausalLM

    from eep.toy import TOY_DIR

    tokenizer = AutoTokenizer.from_pretrained(TOY_DIR)
    config = MixtralConfig(vocab_size=len(tokenizer), num_local_experts=8, num_experts_per_tok=2,
                           max_position_embeddings=64, bos_token_id=2, eos_token_id=3, pad_token_id=0,
                           **RANDOM_SIZES[name])
    torch.manual_seed(0)
    model = MixtralForCausalLM(config)
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


def _config(model: str, device: str, **extra):
    from eep.config import parse_config
    from fitness import toy_tasks

    return parse_config({
        "name": "bench", "model": {"path": model, "device": device},
        "fitness": {"batch_size": 128, "max_new_tokens": 8, "tasks": [
            {"name": t, "dataset": f"toy:{t}", "search_size": 16} for t in toy_tasks.TASKS]}, **extra})


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
        eval_s, eval_spread = median_spread(lambda g=genomes[0]: (worker.scores(g), _sync(device)), repeats)
        rows[name] = {"apply_s": apply_s, "apply_spread_s": apply_spread, "evaluation_s": eval_s,
                      "evaluation_spread_s": eval_spread, "fraction": apply_s / eval_s}
        log(f"[bench] apply {name}: {1e3 * apply_s:.2f} ms of a {eval_s:.3f} s evaluation "
            f"= {100 * apply_s / eval_s:.2f} %")
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
        from eep.moe import assemble, moe_blocks

        small, _ = self.cpu_adapter.compressed(genome)  # slice / merge on CPU
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
        raise EepError("the rebuilt models scored differently from eep's in-place genomes; the comparison is void")
    rate = {name: genomes / seconds for name, (seconds, _) in timed.items()}
    log(f"[bench] {genomes} candidates: eep {rate['eep']:.2f} evals/s, rebuild per candidate "
        f"{rate['rebuild']:.2f} evals/s (same scores) -> {rate['eep'] / rate['rebuild']:.2f}x")
    return {"genomes": genomes, "eep_evals_per_s": rate["eep"], "rebuild_evals_per_s": rate["rebuild"],
            "speedup": rate["eep"] / rate["rebuild"]}


# -- 3 / 4. search: duplicates, Ray scaling ----------------------------------------------------


def bench_search(model: str, device: str, evaluations: int, actors: tuple[tuple[int, int], ...], scratch: Path,
                 log) -> dict:
    """The same search serially and on Ray with each ``(actors, candidates queued per actor)``."""
    from eep.evaluator import FitnessWorker, SerialEvaluator
    from eep.journal import RunDir
    from eep.model import load_hf_config
    from eep.moe import shape_of
    from eep.search import run_search
    from search_spaces import build_schedule

    rows = {}
    for workers, depth in ((0, 1), *actors):
        extra = {"search": {"seed": 0, "evaluations": evaluations, "initial": min(10, evaluations),
                            "in_flight": max(workers, 1) * depth},
                 "search_space": {"kind": "prune", "keep": 4}}
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
        label = (f"ray, {workers} actor{'s' if workers > 1 else ''}" + (f", {depth} queued each" if depth > 1 else "")
                 if workers else "serial")
        rows[label] = {"evaluations": len(keys), "evals_per_s": len(keys) / seconds, "busy_fraction": busy,
                       "rebred": stats["rebred"], "reevaluations": len(keys) - len(set(keys)),
                       "best_fitness": summary["best_fitness"]}
        log(f"[bench] search, {label}: {len(keys) / seconds:.2f} evals/s"
            + (f", actors busy {100 * busy:.1f} %" if busy is not None else "")
            + f"; {stats['rebred']} duplicate children bred again, {rows[label]['reevaluations']} re-evaluated")
    return rows


# -- 5. export --------------------------------------------------------------------------------


def _generation(path: str, device: str, batches: tuple[int, ...], new_tokens: int, repeats: int) -> dict:
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

        def generate(ids=ids):
            with torch.no_grad():
                model.generate(**ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                               pad_token_id=tokenizer.pad_token_id)
            _sync(dev)

        generate()  # warm-up
        seconds, spread = median_spread(generate, repeats)
        out["tokens_per_s"][str(batch)] = {"median": batch * new_tokens / seconds,
                                           "spread": batch * new_tokens * spread / seconds**2}
    out["peak_memory_bytes"] = torch.cuda.max_memory_allocated(dev) if dev.type == "cuda" else _peak_rss()
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
    from search_spaces import random_genome

    adapter, tokenizer = worker.adapter, worker.tokenizer
    space = half_kept(adapter)
    keep = space.keep
    pruned = random_genome(space, random.Random(2))
    variants = {"full": None, f"keep {keep} of {adapter.num_experts}": pruned,
                f"keep {keep} of {adapter.num_experts}, top-1": Genome.from_keep(
                    adapter.num_experts, adapter.top_k, pruned.keep_map(), active=1)}
    rows = {}
    context = multiprocessing.get_context("spawn")
    for name, genome in variants.items():
        path = scratch / f"export-{len(rows)}"
        model = worker.model if genome is None else adapter.compressed(genome)[0]
        model.save_pretrained(path)
        tokenizer.save_pretrained(path)
        with context.Pool(1) as pool:
            row = pool.apply(_generation, (str(path), device, (1, 32), NEW_TOKENS, repeats))
        row["disk_bytes"] = sum(f.stat().st_size for f in path.iterdir() if f.suffix == ".safetensors")
        rows[name] = row
        log(f"[bench] {name}: {row['parameters']:,} parameters, {row['disk_bytes'] / 2**20:.1f} MiB, "
            f"{row['tokens_per_s']['1']['median']:.0f} / {row['tokens_per_s']['32']['median']:.0f} tokens/s "
            f"at batch 1 / 32, peak {row['peak_memory_bytes'] / 2**20:.0f} MiB")
    full = rows["full"]["tokens_per_s"]
    for row in rows.values():
        row["speedup"] = {b: row["tokens_per_s"][b]["median"] / full[b]["median"] for b in full}
    return rows


# -- the command ------------------------------------------------------------------------------


def run_bench(model: str = "toy", out: str | Path = "bench", device: str = "auto", repeats: int = 5,
              evaluations: int = 40, rebuild_genomes: int = 8, ray: bool = True,
              log: Callable[[str], None] = print) -> dict:
    """Run every measurement on ``model`` (``toy``, ``random-mixtral``, ``random-100m`` or a path)
    and write ``bench.json`` and ``bench.md`` to ``out``."""
    from eep.evaluator import FitnessWorker
    from eep.journal import check_creatable
    from eep.model import pick_device

    out = Path(out)
    if out.exists() and not out.is_dir():
        raise EepError(f"--out {out} is a file; give a directory")
    check_creatable(out / "bench.json", "the benchmark output")
    dev = pick_device(device)
    with torch.no_grad(), tempfile.TemporaryDirectory(prefix="eep-bench-") as tmp:
        scratch = Path(tmp)
        path = random_mixtral(scratch / "model", model) if model in RANDOM_SIZES else model
        worker = FitnessWorker(_config(path, str(dev)))
        params = sum(p.numel() for p in worker.model.parameters())
        log(f"[bench] {model}: {params / 1e6:.1f} M parameters on {dev}; medians of {repeats}")
        result = {"model": model, "parameters": params, "device": str(dev), "machine": machine(dev),
                  "repeats": repeats}
        result["apply"] = bench_apply(worker, repeats, log)
        result["rebuild"] = bench_rebuild(worker, rebuild_genomes, log)
        result["export"] = bench_export(worker, str(dev), scratch, repeats, log)
        del worker
        actors = ((1, 1), (2, 1), (2, 2)) if ray else ()
        result["search"] = bench_search(path, str(dev), evaluations, actors, scratch, log)
    search = result["search"]
    result.update(
        apply_fraction_prune=result["apply"]["prune"]["fraction"],
        apply_fraction_merge=result["apply"]["merge"]["fraction"],
        speedup_vs_rebuild=result["rebuild"]["speedup"],
        reevaluations=search["serial"]["reevaluations"],
        busy_fraction=search["ray, 2 actors, 2 queued each"]["busy_fraction"] if ray else None,
        export_speedup={name: row["speedup"] for name, row in result["export"].items() if name != "full"})
    result["goals"] = {key: _meets(result[key], *goal) for key, goal in GOALS.items() if result[key] is not None}
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

    lines = [f"# eep bench: {r['model']} ({r['parameters'] / 1e6:.1f} M parameters) on {r['device']}",
             "", f"Machine: {r['machine']}. Medians of {r['repeats']} runs ± half their range; ratios from one run.",
             "", "| measure | value | goal |", "|---|---|---|"]
    for name in ("prune", "merge"):
        a = r["apply"][name]
        lines.append(f"| apply + restore a {name} genome / one evaluation | {1e3 * a['apply_s']:.2f} ms / "
                     f"{a['evaluation_s']:.3f} s = {pct(a['fraction'])} | {goal('apply_fraction_' + name)} |")
    rb = r["rebuild"]
    lines.append(f"| evals/s: eep in place vs rebuild per candidate ({rb['genomes']} genomes, same scores) | "
                 f"{rb['eep_evals_per_s']:.2f} vs {rb['rebuild_evals_per_s']:.2f} = {rb['speedup']:.2f}x | "
                 f"{goal('speedup_vs_rebuild')} |")
    serial = r["search"]["serial"]
    lines.append(f"| search of {serial['evaluations']}: duplicate children bred again / genomes re-evaluated | "
                 f"{serial['rebred']} / {serial['reevaluations']} | re-evaluated {goal('reevaluations')} |")
    lines += ["", "| evaluator | evals/s | vs serial | actors busy |", "|---|---|---|---|"]
    for label, row in r["search"].items():
        busy = "" if row["busy_fraction"] is None else pct(row["busy_fraction"])
        lines.append(f"| {label} | {row['evals_per_s']:.2f} | {row['evals_per_s'] / serial['evals_per_s']:.2f}x | {busy} |")
    if r["busy_fraction"] is not None:
        lines.append(f"\nSteady-state busy fraction of 2 actors holding 2 candidates each: {pct(r['busy_fraction'])}, "
                     f"goal {goal('busy_fraction')} (with one each: "
                     f"{pct(r['search']['ray, 2 actors']['busy_fraction'])}; actor-measured evaluation time).")
    lines += ["", "| model | parameters | on disk | peak memory | tokens/s, batch 1 | tokens/s, batch 32 |",
              "|---|---|---|---|---|---|"]
    for name, row in r["export"].items():
        tps = row["tokens_per_s"]
        cells = [f"{tps[b]['median']:.0f} ± {tps[b]['spread']:.0f} ({row['speedup'][b]:.2f}x)" for b in ("1", "32")]
        lines.append(f"| {name} | {row['parameters']:,} | {row['disk_bytes'] / 2**20:.1f} MiB | "
                     f"{row['peak_memory_bytes'] / 2**20:.0f} MiB | {cells[0]} | {cells[1]} |")
    return "\n".join(lines) + "\n"


__all__ = ["Rebuild", "random_mixtral", "run_bench"]
