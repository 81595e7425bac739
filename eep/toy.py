"""The embedded toy model: a small Mixtral (8 experts, top-2) trained on the synthetic tasks
of :mod:`fitness.toy_tasks`, shipped inside the package so every demo and test runs offline.

How it is made to need the right experts (a property of this toy, not of real models): each
MoE layer assigns every one of the 8 tasks a pair of experts (the edges of :data:`GRAPH`,
relabelled per layer, see :func:`expert_pairs`), and a routing loss teaches the router to send a
task's tokens to its pair. Half of the training batches run with a smallest covering keep set
pruned to (5 experts holding one of every task's pair), so each expert can serve its tasks alone.
No 4 experts cover every task, so at 4 of 8 every layer must take one task's both experts away,
and which task, in which layers, is the whole question; the residual stream lets a task survive
losing its experts in some layers, so the answer is found by trying, not by counting. A random keep
set loses several tasks.

``eep toy build`` retrains it deterministically from a seed (a few minutes on 2 CPU cores).
"""

from __future__ import annotations

import contextlib
import itertools
import json
import random
import time
from importlib import resources
from pathlib import Path

import torch
from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import MixtralConfig, MixtralForCausalLM, PreTrainedTokenizerFast

from eep.genome import Genome
from eep.moe import MoEAdapter
from fitness import toy_tasks

TOY_DIR = Path(str(resources.files("eep") / "toy_model"))


def toy_config(vocab_size: int) -> MixtralConfig:
    return MixtralConfig(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_local_experts=8,
        num_experts_per_tok=2,
        max_position_embeddings=32,
        rms_norm_eps=1e-6,
        tie_word_embeddings=False,
        bos_token_id=2,
        eos_token_id=3,
        pad_token_id=0,
        router_aux_loss_coef=0.0,
    )


def build_tokenizer(words: list[str] | None = None) -> PreTrainedTokenizerFast:
    """A word-level tokenizer over ``words`` (default: the toy tasks' vocabulary)."""
    vocab = {word: i for i, word in enumerate(words or toy_tasks.vocabulary())}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.post_processor = processors.TemplateProcessing(
        single="<bos> $A", special_tokens=[("<bos>", vocab["<bos>"])]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<bos>",
        eos_token="<eos>",
        pad_token="<pad>",
        unk_token="<unk>",
        padding_side="left",
        clean_up_tokenization_spaces=False,
    )


# Every layer's task-expert graph (experts are vertices, each task the edge between its two
# experts) before a per-layer random relabelling: two triangles, an edge, and a bridge between the
# triangles. Covering every edge takes 5 experts (2 per triangle, 1 of the lone edge); with 4, one
# task must lose both of its experts, and any task but the bridge's can be the one.
GRAPH = ((0, 1), (1, 2), (0, 2), (3, 4), (4, 5), (3, 5), (6, 7), (2, 3))


def expert_pairs(
    seed: int, num_layers: int, num_experts: int = 8
) -> list[dict[str, tuple[int, int]]]:
    """Per layer, the pair of experts each task is taught to use: the edges of :data:`GRAPH`, with
    experts and tasks relabelled at random in every layer."""
    if len(toy_tasks.TASKS) != num_experts or len(GRAPH) != num_experts:
        raise ValueError(
            f"the toy pairs {len(toy_tasks.TASKS)} tasks with as many experts, got {num_experts}"
        )
    rng = random.Random(f"graph/{seed}")
    pairs = []
    for _ in range(num_layers):
        experts = rng.sample(range(num_experts), num_experts)
        edges = rng.sample(GRAPH, len(GRAPH))
        pairs.append(
            {
                t: tuple(sorted((experts[a], experts[b])))
                for t, (a, b) in zip(toy_tasks.TASKS, edges)
            }
        )
    return pairs


def covers(
    layer_pairs: dict[str, tuple[int, int]], size: int, num_experts: int = 8
) -> dict[tuple[int, ...], tuple]:
    """Keep sets of ``size`` experts, each with the tasks it loses (both of their experts dropped);
    only the sets losing the fewest tasks."""
    lost = {
        keep: tuple(t for t, pair in layer_pairs.items() if not set(pair) & set(keep))
        for keep in itertools.combinations(range(num_experts), size)
    }
    fewest = min(len(v) for v in lost.values())
    return {keep: tasks for keep, tasks in lost.items() if len(tasks) == fewest}


def covering_genome(
    pairs, num_experts: int, top_k: int, rng: random.Random, size: int = 5
) -> Genome:
    """In every layer, a random smallest keep set that holds an expert of every task (5 of 8 here):
    what training prunes to, so that each expert learns to serve its tasks alone."""
    return Genome.from_keep(
        num_experts,
        top_k,
        {
            layer: rng.choice(sorted(covers(layer_pairs, size, num_experts)))
            for layer, layer_pairs in enumerate(pairs)
        },
    )


def sacrificing_genome(
    pairs, task: str, num_experts: int, top_k: int, size: int = 4
) -> Genome | None:
    """``size`` experts per layer losing only ``task``, in every layer (the best 4-of-8 genomes
    there are); None when some layer cannot lose just that task."""
    keep = {}
    for layer, layer_pairs in enumerate(pairs):
        sets = [k for k, lost in covers(layer_pairs, size, num_experts).items() if lost == (task,)]
        if not sets:
            return None
        keep[layer] = sets[0]
    return Genome.from_keep(num_experts, top_k, keep)


def _batch(tokenizer, rng: random.Random, size: int, tasks_module=toy_tasks):
    rows, tasks = [], []
    for _ in range(size):
        task = rng.choice(tasks_module.TASKS)
        seq = [
            rng.choice(tasks_module.SYMBOLS)
            for _ in range(rng.randint(tasks_module.MIN_LEN, tasks_module.MAX_LEN))
        ]
        if tasks_module.split_of(task, seq) != "train":
            continue
        ex = tasks_module.make_example(task, seq)
        prompt = tokenizer(ex.prompt)["input_ids"]
        answer = tokenizer(ex.answer, add_special_tokens=False)["input_ids"] + [
            tokenizer.eos_token_id
        ]
        rows.append((prompt, answer))
        tasks.append(task)
    width = max(len(p) + len(a) for p, a in rows)
    ids = torch.full((len(rows), width), tokenizer.pad_token_id)
    labels = torch.full((len(rows), width), -100)
    for r, (p, a) in enumerate(rows):
        ids[r, : len(p) + len(a)] = torch.tensor(p + a)
        labels[r, len(p) : len(p) + len(a)] = torch.tensor(a)
    return ids, labels, tasks


@torch.enable_grad()  # whatever the caller disabled
def train(
    out_dir: Path,
    seed: int = 0,
    steps: int = 2500,
    batch_size: int = 64,
    log=print,
    *,
    tasks_module=toy_tasks,
    new_model=None,
    expert_sets=expert_pairs,
    sets_key: str = "expert_pairs",
    cover_size: int = 5,
) -> dict:
    """Train the toy from ``seed`` and save it (weights, config, tokenizer, pairing) to ``out_dir``.

    The keywords make another toy (:mod:`eep.toy_qwen`): its tasks module, ``new_model(vocab_size)``,
    ``expert_sets(seed, num_layers, num_experts)`` (per layer, each task's experts), the json key
    they are saved under, and the size of the covering keep sets half the batches are pruned to."""
    torch.manual_seed(seed)
    torch.use_deterministic_algorithms(True)
    rng = random.Random(seed)
    tokenizer = build_tokenizer(tasks_module.vocabulary())
    model = (new_model or (lambda vocab: MixtralForCausalLM(toy_config(vocab))))(len(tokenizer))
    adapter = MoEAdapter(model)
    num_layers = model.config.num_hidden_layers
    pairs = expert_sets(seed, num_layers, adapter.num_experts)
    # route_target[layer][task] = the task's experts, sharing one unit of probability
    targets = torch.zeros(num_layers, len(tasks_module.TASKS), adapter.num_experts)
    for layer, layer_pairs in enumerate(pairs):
        for t, task in enumerate(tasks_module.TASKS):
            targets[layer, t, list(layer_pairs[task])] = 1 / len(layer_pairs[task])
    optim = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.OneCycleLR(
        optim, max_lr=3e-3, total_steps=steps, pct_start=0.05
    )
    model.train()
    start = time.time()
    for step in range(steps):
        ids, labels, tasks = _batch(tokenizer, rng, batch_size, tasks_module)
        task_idx = torch.tensor([tasks_module.TASKS.index(t) for t in tasks])
        real = ids != tokenizer.pad_token_id
        real[:, 0] = False  # <bos> carries no task information yet
        pruned = rng.random() < 0.5
        context = (
            adapter.applied(
                covering_genome(pairs, adapter.num_experts, adapter.top_k, rng, cover_size)
            )
            if pruned
            else contextlib.nullcontext()
        )
        with context:
            out = model(input_ids=ids, labels=labels, output_router_logits=True)
        route_loss = 0.0
        for layer, logits in enumerate(out.router_logits):
            logp = torch.log_softmax(logits.view(*ids.shape, -1).float(), dim=-1)
            target = targets[layer][task_idx][:, None, :]
            route_loss = route_loss - ((logp * target).sum(-1) * real).sum() / real.sum()
        loss = out.loss + 0.1 * route_loss / len(out.router_logits)
        optim.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optim.step()
        sched.step()
        if step % 100 == 0 or step == steps - 1:
            log(
                f"[toy] step {step:5d}/{steps}  lm {out.loss.item():.4f}  route {route_loss.item() / len(out.router_logits):.4f}"
                f"  {time.time() - start:.0f}s"
            )
    model.eval()
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    info = {
        "seed": seed,
        "steps": steps,
        "batch_size": batch_size,
        "tasks": list(tasks_module.TASKS),
        sets_key: [{t: list(p) for t, p in layer.items()} for layer in pairs],
    }
    (out_dir / "eep_toy.json").write_text(json.dumps(info, indent=1) + "\n")
    return info
