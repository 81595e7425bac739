"""The embedded toy model: a small Mixtral (8 experts, top-2) trained on the synthetic tasks
of :mod:`fitness.toy_tasks`, shipped inside the package so every demo and test runs offline.

How it is made to need the right experts (a property of this toy, not of real models): each
MoE layer assigns every one of the 8 tasks a pair of experts, the pairs forming a ring (see
:func:`expert_pairs`), and a routing loss teaches the router to send a task's tokens to its
pair. Half of the training batches run with half of the ring pruned, so each expert can serve
its tasks alone. Keeping an alternating half of the ring in every layer therefore keeps every
skill; a random keep set drops both experts of some task in some layer and loses that task.

``eep toy build`` retrains it deterministically from a seed (a few minutes on 2 CPU cores).
"""

from __future__ import annotations

import contextlib
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
        vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=2, num_local_experts=8, num_experts_per_tok=2,
        max_position_embeddings=32, rms_norm_eps=1e-6, tie_word_embeddings=False,
        bos_token_id=2, eos_token_id=3, pad_token_id=0, router_aux_loss_coef=0.0,
    )


def build_tokenizer() -> PreTrainedTokenizerFast:
    vocab = {word: i for i, word in enumerate(toy_tasks.vocabulary())}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", vocab["<bos>"])])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>", unk_token="<unk>",
        padding_side="left", clean_up_tokenization_spaces=False,
    )


def expert_pairs(seed: int, num_layers: int, num_experts: int = 8) -> list[dict[str, tuple[int, int]]]:
    """Per layer, the pair of experts each task is taught to use.

    Tasks and experts form a ring (task j uses ring positions j and j+1; the ring order is a
    random permutation per layer), so each expert serves two tasks and only the two alternating
    halves of the ring keep an expert of every task: 2 of the C(8,4) = 70 keep sets per layer.
    """
    if len(toy_tasks.TASKS) != num_experts:
        raise ValueError(f"the toy pairs {len(toy_tasks.TASKS)} tasks with as many experts, got {num_experts}")
    rng = random.Random(f"pairs/{seed}")
    pairs = []
    for _ in range(num_layers):
        ring = rng.sample(range(num_experts), num_experts)
        pairs.append({t: (ring[j], ring[(j + 1) % num_experts]) for j, t in enumerate(toy_tasks.TASKS)})
    return pairs


def covering_genome(pairs, num_experts: int, top_k: int, rng: random.Random) -> Genome:
    """In every layer, one of the two alternating halves of the task ring: an expert of every
    task's pair is kept, with half of the experts. These are the keep sets the toy rewards."""
    keep = {}
    for layer, layer_pairs in enumerate(pairs):
        ring = [layer_pairs[t][0] for t in toy_tasks.TASKS]
        keep[layer] = ring[rng.randrange(2)::2]
    return Genome.from_keep(num_experts, top_k, keep)


def _batch(tokenizer, rng: random.Random, size: int):
    rows, tasks = [], []
    for _ in range(size):
        task = rng.choice(toy_tasks.TASKS)
        seq = [rng.choice(toy_tasks.SYMBOLS) for _ in range(rng.randint(toy_tasks.MIN_LEN, toy_tasks.MAX_LEN))]
        if toy_tasks.split_of(task, seq) != "train":
            continue
        ex = toy_tasks.make_example(task, seq)
        prompt = tokenizer(ex.prompt)["input_ids"]
        answer = tokenizer(ex.answer, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        rows.append((prompt, answer))
        tasks.append(task)
    width = max(len(p) + len(a) for p, a in rows)
    ids = torch.full((len(rows), width), tokenizer.pad_token_id)
    labels = torch.full((len(rows), width), -100)
    for r, (p, a) in enumerate(rows):
        ids[r, : len(p) + len(a)] = torch.tensor(p + a)
        labels[r, len(p): len(p) + len(a)] = torch.tensor(a)
    return ids, labels, tasks


def train(out_dir: Path, seed: int = 0, steps: int = 2500, batch_size: int = 64, log=print) -> dict:
    """Train the toy from ``seed`` and save it (weights, config, tokenizer, pairing) to ``out_dir``."""
    torch.manual_seed(seed)
    torch.use_deterministic_algorithms(True)
    rng = random.Random(seed)
    tokenizer = build_tokenizer()
    config = toy_config(len(tokenizer))
    model = MixtralForCausalLM(config)
    adapter = MoEAdapter(model)
    pairs = expert_pairs(seed, config.num_hidden_layers, config.num_local_experts)
    # route_target[layer][task] = the task's pair as a 0/1 row over experts
    targets = torch.zeros(config.num_hidden_layers, len(toy_tasks.TASKS), config.num_local_experts)
    for layer, layer_pairs in enumerate(pairs):
        for t, task in enumerate(toy_tasks.TASKS):
            targets[layer, t, list(layer_pairs[task])] = 0.5
    optim = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.OneCycleLR(optim, max_lr=3e-3, total_steps=steps, pct_start=0.05)
    model.train()
    start = time.time()
    for step in range(steps):
        ids, labels, tasks = _batch(tokenizer, rng, batch_size)
        task_idx = torch.tensor([toy_tasks.TASKS.index(t) for t in tasks])
        real = ids != tokenizer.pad_token_id
        real[:, 0] = False  # <bos> carries no task information yet
        pruned = rng.random() < 0.5
        context = (adapter.applied(covering_genome(pairs, adapter.num_experts, adapter.top_k, rng))
                   if pruned else contextlib.nullcontext())
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
            log(f"[toy] step {step:5d}/{steps}  lm {out.loss.item():.4f}  route {route_loss.item() / len(out.router_logits):.4f}"
                f"  {time.time() - start:.0f}s")
    model.eval()
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    info = {"seed": seed, "steps": steps, "batch_size": batch_size, "tasks": list(toy_tasks.TASKS),
            "expert_pairs": [{t: list(p) for t, p in layer.items()} for layer in pairs]}
    (out_dir / "eep_toy.json").write_text(json.dumps(info, indent=1) + "\n")
    return info

