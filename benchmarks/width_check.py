"""The rows of ``eep bench`` that the experts kernel decides, at Mixtral width, and where one
evaluation's time goes; a short run for a lent GPU (about 2 minutes on an H200).

    python benchmarks/width_check.py [--device cuda] [--model random-mixtral-width] [--layers 2]
                                     [--skip-swap] [--out width-check]

Prints and writes ``width_check.json``:
- a decode step of plain ``generate`` over 128 prompts with the kernel eep chose kept, and with
  ``transformers``' decode-time swap to ``batched_mm`` (time and, on a GPU, peak memory each), set
  against the roofline (every weight read once at the bandwidth a device copy reaches);
- ``eep bench``'s scoring row (teacher-forced vs generated evaluation, same verdicts checked) and
  rebuild row (eep in place vs rebuilding a model per candidate, same scores checked);
- the operators one teacher-forced evaluation spends its time in (``torch.profiler``).
"""

from __future__ import annotations

import argparse
import json
import random
import tempfile
from pathlib import Path

import torch

from eep.bench import (
    RANDOM_SIZES,
    WIDE,
    _bandwidth,
    _config,
    _free,
    _sync,
    bench_rebuild,
    bench_scoring,
    decode_step,
    half_kept,
    random_mixtral,
)
from eep.evaluator import FitnessWorker
from eep.model import pick_device
from fitness import toy_tasks


def decode(worker, swap: bool, repeats: int) -> dict:
    """A greedy decode step over 128 prompts (:func:`eep.bench.decode_step`, 8 new tokens)."""
    model, tokenizer = worker.model, worker.tokenizer
    device = next(model.parameters()).device
    prompts = [e.prompt for t in toy_tasks.TASKS for e in toy_tasks.examples(t, "test", 16)]
    ids = tokenizer(prompts, return_tensors="pt", padding=True).to(device)
    if swap:  # transformers' own method again: grouped_mm -> batched_mm while decoding
        del model._optimize_model_for_decode
    try:
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        step, _ = decode_step(model, tokenizer, ids, 8, repeats)
        peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
    finally:
        if swap:
            from eep.model import keep_experts_kernel

            keep_experts_kernel(model)
    return {"step_s": step, "peak_bytes": peak, "batch": len(prompts)}


def profile(worker, rows: int = 15) -> str:
    """The operator table of one teacher-forced evaluation of a half-kept genome."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    from search_spaces import random_genome

    adapter, scorer = worker.adapter, worker.scorers["search"]
    device = next(worker.model.parameters()).device
    genome = random_genome(half_kept(adapter), random.Random(5))
    with adapter.applied(genome):
        scorer.example_scores()  # warm-up
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with torch_profile(activities=activities) as prof:
        with adapter.applied(genome):
            scorer.example_scores()
        _sync(device)
    key = "cuda_time_total" if device.type == "cuda" else "cpu_time_total"
    return prof.key_averages().table(sort_by=key, row_limit=rows)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="auto")
    parser.add_argument("--model", default=WIDE, choices=sorted(RANDOM_SIZES))
    parser.add_argument("--layers", type=int, default=None)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--skip-swap",
        action="store_true",
        help="skip the decode step with transformers' swap to batched_mm (~45 GiB a layer at width)",
    )
    parser.add_argument("--out", default="width-check")
    args = parser.parse_args(argv)
    dev = pick_device(args.device)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    result: dict = {"model": args.model, "device": str(dev)}
    with torch.no_grad(), tempfile.TemporaryDirectory(prefix="eep-width-") as tmp:
        layers = args.layers if args.model == WIDE else None
        build = str(dev) if args.model == WIDE else "cpu"
        path = random_mixtral(Path(tmp) / "model", args.model, layers, build)
        worker = FitnessWorker(_config(path, str(dev)))
        model = worker.model
        weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
        roofline = weight_bytes / _bandwidth(dev)
        result["experts_implementation"] = model.config._experts_implementation
        result["roofline_step_s"] = roofline
        print(
            f"[width] {args.model}: {weight_bytes / 2**30:.2f} GiB of weights on {dev}, experts kernel "
            f"{result['experts_implementation']}; roofline {1e3 * roofline:.2f} ms a step",
            flush=True,
        )
        rows = (("kept", False),) + (() if args.skip_swap else (("swapped to batched_mm", True),))
        for name, swap in rows:
            row = decode(worker, swap, args.repeats)
            row["roofline_ratio"] = row["step_s"] / roofline
            result[f"decode, {name}"] = row
            peak = (
                "" if row["peak_bytes"] is None else f", peak {row['peak_bytes'] / 2**30:.1f} GiB"
            )
            print(
                f"[width] decode step, batch {row['batch']}, kernel {name}: {1e3 * row['step_s']:.2f} ms "
                f"= {row['roofline_ratio']:.1f}x the roofline{peak}",
                flush=True,
            )
            _free(dev)
        result["scoring"] = bench_scoring(worker, 4, args.repeats, print)
        _free(dev)
        table = profile(worker)
        print(table, flush=True)
        (out / "profile.txt").write_text(table)
        _free(dev)
        result["rebuild"] = bench_rebuild(worker, 8, print)
    (out / "width_check.json").write_text(json.dumps(result, indent=1) + "\n")
    return result


if __name__ == "__main__":
    main()
