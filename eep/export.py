"""Export a genome as a smaller Hugging Face checkpoint that stock ``transformers`` loads.

The directory is written under a temporary name and renamed at the end, so a crash never
leaves a half-written model behind under the requested name.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path

from eep.config import Config, ModelConfig
from eep.errors import EepError
from eep.genome import Genome


def check_target(out: Path) -> None:
    """Refuse an existing target and an unwritable parent before anything is loaded."""
    if out.exists():
        raise EepError(f"export target {out} already exists; choose a new --out or remove it")
    parent = out.parent if str(out.parent) else Path(".")
    probe = parent
    while not probe.exists():
        probe = probe.parent
    if not os.access(probe, os.W_OK):
        raise EepError(f"cannot write the export under {parent}: permission denied")


def export_genome(model_cfg: ModelConfig, genome: Genome, out: str | Path, config: Config | None = None,
                  search_fitness: float | None = None, log: Callable[[str], None] = print) -> dict:
    """Write the pruned model, its tokenizer, ``eep_genome.json`` and a model card to ``out``.

    When ``config`` is given its tasks' held-out split is scored on the exported model itself.
    Returns the report written into the card.
    """
    from eep.model import load_model
    from eep.moe import adapter_for

    out = Path(out)
    check_target(out)
    model, tokenizer = load_model(model_cfg)
    adapter = adapter_for(model)
    adapter.validate(genome)
    log(f"[eep] slicing {len(adapter.moe_layers)} MoE layers to the genome's kept experts")
    small = adapter.sliced(genome)
    report = {
        "source_model": model_cfg.path,
        "genome_key": genome.key,
        "experts_per_layer": {"before": adapter.num_experts, "after": small.config.num_local_experts},
        "experts_per_token": {"before": adapter.top_k, "after": small.config.num_experts_per_tok},
        "parameters": {"before": _count(model), "after": _count(small)},
        "search_fitness": search_fitness,
        "heldout": None,
    }
    del model
    if config is not None:
        from fitness.generation import evaluate_tasks, weighted_fitness
        from fitness.tasks import load_tasks

        tasks = load_tasks(config.fitness.tasks, "test")
        scores = evaluate_tasks(small, tokenizer, tasks, config.fitness.batch_size, config.fitness.max_new_tokens)
        report["heldout"] = {"scores": scores, "mean": weighted_fitness(tasks, scores)}
    tmp = out.parent / f".{out.name}.partial-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        small.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        genome.save(tmp / "eep_genome.json")
        (tmp / "eep_report.json").write_text(json.dumps(report, indent=1) + "\n")
        (tmp / "README.md").write_text(model_card(report, genome))
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    report["disk_bytes"] = sum(f.stat().st_size for f in out.iterdir())
    return report


def _count(model) -> int:
    return sum(p.numel() for p in model.parameters())


def model_card(report: dict, genome: Genome) -> str:
    before, after = report["parameters"]["before"], report["parameters"]["after"]
    lines = [
        "---", "library_name: transformers", "tags: [eep, moe, expert-pruning]", "---", "",
        f"# Expert-pruned {report['source_model']}", "",
        "Made with `eep` (evolutionary expert pruning): only the experts listed in `eep_genome.json` "
        "are stored; routing over them is the source model's routing restricted to the kept experts.", "",
        f"- source model: `{report['source_model']}`",
        f"- experts per MoE layer: {report['experts_per_layer']['before']} → {report['experts_per_layer']['after']}",
        f"- active experts per token: {report['experts_per_token']['before']} → {report['experts_per_token']['after']}",
        f"- parameters: {before:,} → {after:,} ({100 * after / before:.1f} %)",
        f"- genome: `{genome.key}`",
    ]
    if report["search_fitness"] is not None:
        lines.append(f"- search fitness (search split): {report['search_fitness']:.2f}")
    if report["heldout"] is not None:
        per_task = ", ".join(f"{k} {v:.1f}" for k, v in report["heldout"]["scores"].items())
        lines.append(f"- held-out accuracy of this checkpoint: {report['heldout']['mean']:.2f} ({per_task})")
    lines += ["", "## Kept experts", "", "| layer | kept experts |", "|---|---|"]
    lines += [f"| {layer} | {', '.join(map(str, keep))} |" for layer, keep in genome.keep_map().items()]
    return "\n".join(lines) + "\n"
