"""Export a genome as a smaller Hugging Face checkpoint.

Two forms (the adapter decides, :meth:`eep.moe.MoEAdapter.export_form`, and the report says
which and why):

- ``stock``: uniform expert count and top-k, experts kept or merged, routing that only selects
  experts. Stock ``AutoModelForCausalLM.from_pretrained(path)`` loads it; no custom code.
- ``custom``: per-layer expert counts or top-k, or a router matrix that mixes experts. The
  checkpoint stores only the kept/merged experts and a modeling file ``eep`` writes next to
  them; ``from_pretrained(path, trust_remote_code=True)`` loads it (and :func:`eep.model.load_model`
  does without remote code).

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
from eep.journal import check_creatable, share_tree


def check_target(out: Path) -> None:
    """Refuse an existing target and an unwritable parent before anything is loaded."""
    if out.exists():
        raise EepError(f"export target {out} already exists; choose a new --out or remove it")
    check_creatable(out, "the export target")


def export_genome(
    model_cfg: ModelConfig,
    genome: Genome,
    out: str | Path,
    config: Config | None = None,
    search_fitness: float | None = None,
    log: Callable[[str], None] = print,
    form: str | None = None,
    dense: bool = False,
    scales: str | Path | None = None,
    search_progress: tuple[int, int] | None = None,
    latency: dict | None = None,
) -> dict:
    """Write the compressed model, its tokenizer, ``eep_genome.json`` and a model card to ``out``.

    ``form`` forces ``stock`` (an error if impossible) or ``custom``; default: stock when possible.
    ``dense``: low-rank experts are written re-multiplied (the form their pruning needs) instead of
    as factors (custom form). ``scales``: the activation scales file an activation-aware genome
    needs (copied into ``out`` beside ``eep_genome.json``).

    When ``config`` is given its tasks' held-out split is scored on the exported model itself.
    ``search_progress``: (evaluations done, planned) of the search the genome comes from.
    ``latency``: what a latency frontier measured of the genome (``share`` of the source model's
    time, ``ms``). Returns the report written into the card.
    """
    from eep.lowrank import scales_for
    from eep.model import load_hf_config, load_model
    from eep.moe import adapter_for, check_genome, moe_blocks, shape_of
    from eep.surgery import compress, export_form
    from fitness.tasks import load_tasks

    out = Path(out)
    check_target(out)
    shape = shape_of(load_hf_config(model_cfg))
    check_genome(genome, shape)
    # an impossible form fails before loading
    export_form(genome.dense() if dense else genome, shape, form)
    # bad task data too
    tasks = load_tasks(config.fitness.tasks, "test") if config is not None else None
    scale_values = scales_for(genome, scales)
    model, tokenizer = load_model(model_cfg)
    adapter = adapter_for(model)
    adapter.use_scales(scale_values)
    small, chosen = compress(adapter, genome, form, dense=dense)
    log(f"[eep] {chosen.kind} form: {chosen.reason}")
    report = {
        "source_model": model_cfg.path,
        "genome_key": genome.key,
        "form": chosen.kind,
        "form_reason": chosen.reason,
        "experts_per_layer": {
            "before": adapter.num_experts,
            "after": {str(i): genome.gene(i).slots for i in adapter.moe_layers},
        },
        "experts_per_token": {
            "before": adapter.top_k,
            "after": {str(i): genome.active(i) for i in adapter.moe_layers},
        },
        "parameters": {"before": _count(model), "after": _count(small)},
        "tensors": {"before": _tensors(model), "after": _tensors(small)},
        "low_rank": None if not genome.is_low_rank else ("dense" if dense else "factors"),
        "search_fitness": search_fitness,
        "search_evaluations": None
        if search_progress is None
        else {"done": search_progress[0], "planned": search_progress[1]},
        "heldout": None,
        **({"latency": latency} if latency is not None else {}),
    }
    if config is not None:  # fidelity tasks compare with the full model, so score while it is here
        from fitness.metrics import weighted_fitness
        from fitness.scoring import Scorer

        fit = config.fitness
        from eep.progress import Progress

        scorer = Scorer(
            model,
            tokenizer,
            tasks,
            fit.batch_size,
            fit.max_new_tokens,
            fit.max_length,
            adapter.blocks,
            fit.scoring,
        )
        progress = Progress("held-out scoring of the export (chunks)", len(scorer.chunks), log)
        scores = scorer(small, moe_blocks(small), progress=progress.step)
        progress.close()
        report["heldout"] = {"scores": scores, "mean": weighted_fitness(fit.tasks, scores)}
        del scorer
    del model
    tmp = out.parent / f".{out.name}.partial-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        save_model(small, chosen.kind, tmp)
        tokenizer.save_pretrained(tmp)
        genome.save(tmp / "eep_genome.json")
        if scale_values is not None:
            from eep.lowrank import SCALES_FILE

            shutil.copyfile(scales, tmp / SCALES_FILE)
        (tmp / "eep_report.json").write_text(json.dumps(report, indent=1) + "\n")
        (tmp / "README.md").write_text(model_card(report, genome))
        share_tree(tmp)  # shareable like save_pretrained's own files (safetensors are written 0600)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    report["disk_bytes"] = sum(f.stat().st_size for f in out.iterdir())
    params, held = report["parameters"], report.get("heldout")
    log(
        f"[eep] exported to {out} ({report['form']} form): {params['before']:,} -> "
        f"{params['after']:,} parameters, {report['disk_bytes'] / 1e6:.1f} MB on disk"
        + (f", held-out {held['mean']:.2f}" if held else "")
    )
    return report


def save_model(model, kind: str, path: str | Path) -> None:
    """``save_pretrained``, plus for the custom form the modeling file its ``auto_map`` names."""
    model.save_pretrained(path)
    if kind == "custom":
        from eep.remote import MODELING_FILE

        shutil.copyfile(MODELING_FILE, Path(path) / MODELING_FILE.name)


def _count(model) -> int:
    return sum(p.numel() for p in model.parameters())


def _tensors(model) -> int:
    return len(model.state_dict())


def _spread(values: dict) -> str:
    distinct = sorted(set(values.values()))
    return str(distinct[0]) if len(distinct) == 1 else f"{distinct[0]}–{distinct[-1]} (per layer)"


def model_card(report: dict, genome: Genome) -> str:
    before, after = report["parameters"]["before"], report["parameters"]["after"]
    merged = genome.is_merge
    how = (
        "each stored expert is a learned mixture of the source experts (`merge` in `eep_genome.json`) "
        "and routing maps the source router's probabilities onto them (`router`)"
        if merged
        else "only the experts listed in `eep_genome.json` are stored; routing over them is the source "
        "model's routing restricted to the kept experts"
    )
    load = (
        "`AutoModelForCausalLM.from_pretrained(path)` (stock transformers, no custom code)"
        if report["form"] == "stock"
        else "`AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True)` (modeling_eep_moe.py; "
        "`AutoTokenizer.from_pretrained(path, trust_remote_code=True)` too, or it asks)"
    )
    lines = [
        "---",
        "library_name: transformers",
        f"tags: [eep, moe, {'expert-merging' if merged else 'expert-pruning'}]",
        "---",
        "",
        f"# {'Expert-merged' if merged else 'Expert-pruned'} {report['source_model']}",
        "",
        f"Made with `eep` (evolutionary expert pruning): {how}.",
        "",
        f"- source model: `{report['source_model']}`",
        f"- experts per MoE layer: {report['experts_per_layer']['before']} → {_spread(report['experts_per_layer']['after'])}",
        f"- active experts per token: {report['experts_per_token']['before']} → "
        f"{_spread(report['experts_per_token']['after'])}",
        f"- parameters: {before:,} → {after:,} ({100 * after / before:.1f} %)",
        f"- load with {load}; form chosen because: {report['form_reason']}",
        f"- genome: `{genome.key}`",
    ]
    if report.get("low_rank"):
        lines.append(
            "- low-rank experts (MoE-I² stage 2): each kept expert's matrices are its truncated SVD at the rank "
            "in `eep_genome.json` (`rank`), stored "
            + ("as the factors" if report["low_rank"] == "factors" else "re-multiplied (dense)")
        )
    if report["search_fitness"] is not None:
        lines.append(f"- search fitness (search split): {report['search_fitness']:.2f}")
    if report.get("latency"):
        timed = report["latency"]
        lines.append(
            f"- latency measured by the search: {100 * timed['share']:.1f} % of the source model's "
            f"time ({timed['ms']:.3f} ms a forward pass of one batch on the machine it ran on)"
        )
    progress = report.get("search_evaluations")
    if progress is not None:
        unfinished = (
            " — **the search was stopped before it finished**"
            if progress["done"] < progress["planned"]
            else ""
        )
        lines.append(
            f"- search: {progress['done']} of {progress['planned']} planned evaluations{unfinished}"
        )
    if report["heldout"] is not None:
        per_task = ", ".join(f"{k} {v:.1f}" for k, v in report["heldout"]["scores"].items())
        lines.append(
            f"- held-out accuracy of this checkpoint: {report['heldout']['mean']:.2f} ({per_task})"
        )
    title = "source experts drawn on" if merged else "kept experts"
    lines += ["", "## Experts per layer", "", f"| layer | {title} | top-k |", "|---|---|---|"]
    lines += [
        f"| {i} | {', '.join(map(str, gene.keep))} | {genome.active(i)} |"
        for i, gene in genome.layers
    ]
    return "\n".join(lines) + "\n"
