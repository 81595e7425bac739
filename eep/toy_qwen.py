"""The second embedded toy: a small Qwen3-MoE (4 layers, 8 experts, top-2) trained on the tasks of
:mod:`fitness.toy_qwen_tasks`, with an expert-sharing structure unlike the first toy's
(:mod:`eep.toy`). It exists to judge eep's search on a case it was never tuned on: nothing in eep
is tuned on this model, its tasks or its structure.

The structure (relabelled per layer, drawn from the seed by :func:`expert_sets`):

- Pair layers (0, 2): every task is taught to use a pair of experts, the edges of
  :data:`PAIR_SHAPE`, a 5-cycle and a triangle. Covering every task takes 5 experts (3 on the
  cycle, 2 on the triangle); with 4, any one task can be the one that loses both its experts.
- Solo layers (1, 3): two tasks have ONE expert of their own, the other six share the edges of a
  6-cycle (:data:`SOLO_SHAPE`). Covering takes 5 experts again (the two solo experts and every
  other expert of the cycle), but at 4 only a solo task can be the one lost.

The draw is repeated until exactly one task is solo in both solo layers, so at 4 of 8 one task
can be given up in every layer, and the best keep sets lose just that task; at 3 of 8 the best lose
3 tasks, at 2 of 8 5 (random keep sets leave ~5.4, ~6.9 and ~7.7 tasks without any of their
experts in some layer). Whether a task survives losing its experts in one layer (the residual
stream) is left to the model, so the answer is found by trying, not by counting. Training is the
first toy's (:func:`eep.toy.train`): a routing loss, and half the batches pruned to a random
covering keep set of 5 experts per layer.

Measured on the shipped model (100 held-out examples a task, eep's scorer): full model 100 %;
random keep sets 82.8 / 75.7 / 61.7 % at 4 / 3 / 2 of 8 (means of 10); :func:`best_genome`
87.5 / 80.6 / 61.5 %. At 2 of 8 the keep set losing the fewest tasks is no better than random:
some tasks (atbash, halve, max) barely need their experts, so counting lost tasks is not the answer.

``eep toy build --which qwen`` retrains it deterministically from a seed (a few minutes on 2 CPU
cores).
"""

from __future__ import annotations

import itertools
import random
from importlib import resources
from pathlib import Path

import torch
from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

from eep import toy
from eep.genome import Genome
from fitness import toy_qwen_tasks

TOY_QWEN_DIR = Path(str(resources.files("eep") / "toy_qwen_model"))

PAIR_SHAPE = ((0, 1), (1, 2), (2, 3), (3, 4), (0, 4), (5, 6), (6, 7), (5, 7))
SOLO_SHAPE = ((0,), (1,), (2, 3), (3, 4), (4, 5), (5, 6), (6, 7), (2, 7))
LAYER_SHAPES = (PAIR_SHAPE, SOLO_SHAPE, PAIR_SHAPE, SOLO_SHAPE)


def toy_qwen_config(vocab_size: int) -> Qwen3MoeConfig:
    return Qwen3MoeConfig(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        moe_intermediate_size=128,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        num_experts=8,
        num_experts_per_tok=2,
        norm_topk_prob=True,
        decoder_sparse_step=1,
        mlp_only_layers=[],
        max_position_embeddings=32,
        rms_norm_eps=1e-6,
        tie_word_embeddings=False,
        bos_token_id=2,
        eos_token_id=3,
        pad_token_id=0,
        router_aux_loss_coef=0.0,
    )


def expert_sets(
    seed: int, num_layers: int = 4, num_experts: int = 8
) -> list[dict[str, tuple[int, ...]]]:
    """Per layer, the experts each task is taught to use (one or two): :data:`LAYER_SHAPES` with
    experts and tasks relabelled at random in every layer, drawn again until exactly one task is
    solo in both solo layers."""
    if num_layers != len(LAYER_SHAPES) or num_experts != 8 or len(toy_qwen_tasks.TASKS) != 8:
        raise ValueError(
            f"toy-qwen's structure is for 4 layers, 8 experts and 8 tasks, got {num_layers}, {num_experts}"
        )
    rng = random.Random(f"qwen-sets/{seed}")
    while True:
        sets = []
        for shape in LAYER_SHAPES:
            experts = rng.sample(range(num_experts), num_experts)
            tasks = rng.sample(toy_qwen_tasks.TASKS, len(toy_qwen_tasks.TASKS))
            sets.append(
                {
                    t: tuple(sorted(experts[e] for e in shape[tasks.index(t)]))
                    for t in toy_qwen_tasks.TASKS
                }
            )
        if len(set.intersection(*(solo_tasks(layer) for layer in sets[1::2]))) == 1:
            return sets


def solo_tasks(layer_sets: dict[str, tuple[int, ...]]) -> set[str]:
    """The tasks that have one expert of their own in this layer."""
    return {t for t, experts in layer_sets.items() if len(experts) == 1}


def best_genome(sets, size: int, num_experts: int = 8, top_k: int = 2) -> tuple[Genome, set[str]]:
    """A keep set of ``size`` experts per layer that leaves the fewest tasks without any of their
    experts in some layer, and those tasks; found by trying every set of lost tasks, smallest first."""
    options = [
        {
            keep: {t for t, experts in layer.items() if not set(experts) & set(keep)}
            for keep in itertools.combinations(range(num_experts), size)
        }
        for layer in sets
    ]
    for n in range(len(sets[0]) + 1):
        for lost in map(set, itertools.combinations(sets[0], n)):
            keep = {
                i: next((k for k, gone in layer.items() if gone <= lost), None)
                for i, layer in enumerate(options)
            }
            if None not in keep.values():
                return Genome.from_keep(num_experts, top_k, keep), lost
    raise AssertionError("unreachable: a keep set losing every task always fits")


def train(out_dir: Path, seed: int = 0, steps: int = 3500, batch_size: int = 64, log=print) -> dict:
    """Train toy-qwen from ``seed`` and save it (weights, config, tokenizer, structure) to ``out_dir``.
    On one thread, so that the weights do not depend on the machine's core count."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return toy.train(
            out_dir,
            seed,
            steps,
            batch_size,
            log,
            tasks_module=toy_qwen_tasks,
            new_model=lambda vocab: Qwen3MoeForCausalLM(toy_qwen_config(vocab)),
            expert_sets=expert_sets,
            sets_key="expert_sets",
        )
    finally:
        torch.set_num_threads(threads)
