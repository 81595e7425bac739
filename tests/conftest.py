import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import torch

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def tiny_mixtral_config(**overrides):
    from transformers import MixtralConfig

    values = dict(
        vocab_size=48,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_local_experts=8,
        num_experts_per_tok=2,
        max_position_embeddings=64,
        tie_word_embeddings=False,
    )
    values.update(overrides)
    return MixtralConfig(**values)


@pytest.fixture
def tiny_mixtral():
    """A random tiny Mixtral (fp32, eval mode), different weights per expert."""
    from transformers import MixtralForCausalLM

    torch.manual_seed(0)
    model = MixtralForCausalLM(tiny_mixtral_config()).eval()
    # default init gives small router weights: sharpen routing so masks matter
    with torch.no_grad():
        for layer in model.model.layers:
            layer.mlp.gate.weight.normal_(0, 1.0)
    return model


def toy_accuracy(model, tokenizer, tasks_module, per_task: int = 30):
    """``accuracy(genome=None)``: a toy's mean held-out accuracy over its tasks (``per_task`` test
    examples each) with ``genome`` applied to ``model`` (None: the model as it is)."""
    import statistics

    from eep.moe import adapter_for
    from fitness.scoring import Scorer
    from fitness.tasks import Example, Task

    tasks = [
        Task(
            t,
            tuple(
                Example(e.prompt, (e.answer,)) for e in tasks_module.examples(t, "test", per_task)
            ),
        )
        for t in tasks_module.TASKS
    ]
    scorer, adapter = (
        Scorer(model, tokenizer, tasks, batch_size=128, max_new_tokens=8),
        adapter_for(model),
    )

    def accuracy(genome=None) -> float:
        if genome is None:
            return statistics.mean(scorer().values())
        with adapter.applied(genome):
            return statistics.mean(scorer().values())

    return accuracy


def toy_config_dict(**search):
    """A small search on the embedded toy model, fast enough for unit tests; it exports the best by
    search fitness (no validation examples) unless a test asks for them."""
    return {
        "name": "test",
        "model": {"path": "toy", "device": "cpu", "dtype": "float32"},
        "search_space": {"kind": "prune", "keep": 4},
        "search": {"seed": 3, "evaluations": 16, "initial": 6, **search},
        "fitness": {
            "batch_size": 64,
            "max_new_tokens": 7,
            "tasks": [
                {
                    "name": t,
                    "dataset": f"toy:{t}",
                    "search_size": 6,
                    "validation_size": 0,
                    "test_size": 12,
                }
                for t in ("copy", "reverse", "shift", "lookup")
            ],
        },
    }


@contextlib.contextmanager
def local_ray_cluster(nodes: int = 1, cpus_per_node: int = 1):
    """A real Ray cluster on 127.0.0.1 (`ray start --head` plus ``nodes - 1`` nodes joining it),
    yielding its address; stops exactly the processes it started (never `ray stop`)."""
    ray_bin = str(Path(sys.executable).parent / "ray")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "RAY_AUTH_MODE": "disabled"}
    started = []
    # short: Ray's unix socket paths must fit 107 bytes
    temp_dir = tempfile.mkdtemp(prefix="eepray-", dir="/tmp")
    common = [
        "--block",
        f"--num-cpus={cpus_per_node}",
        "--node-ip-address=127.0.0.1",
        "--object-store-memory=100000000",
    ]
    try:
        head = [
            ray_bin,
            "start",
            "--head",
            f"--port={port}",
            "--include-dashboard=false",
            f"--temp-dir={temp_dir}",
        ]
        started.append(
            subprocess.Popen(
                head + common,
                env=env,
                start_new_session=True,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
        )
        time.sleep(8)
        for _ in range(nodes - 1):
            node = [ray_bin, "start", f"--address=127.0.0.1:{port}"]
            started.append(
                subprocess.Popen(
                    node + common,
                    env=env,
                    start_new_session=True,
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                )
            )
            time.sleep(6)
        yield f"127.0.0.1:{port}"
    finally:
        for process in reversed(started):
            try:
                os.killpg(process.pid, signal.SIGTERM)
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
            except ProcessLookupError:
                pass
        shutil.rmtree(temp_dir, ignore_errors=True)


@pytest.fixture(scope="module")
def tokenizer():
    """The toy's tokenizer."""
    from transformers import AutoTokenizer

    from eep import toy

    return AutoTokenizer.from_pretrained(toy.TOY_DIR)
