"""Finding and loading models: ``toy`` names the embedded toy, anything else is a local
directory or a hub id handed to ``transformers``."""

from __future__ import annotations

import contextlib
import functools
import json
from pathlib import Path

import torch

from eep.config import ModelConfig
from eep.errors import EepError

DEFAULT_THREADS = 1
"""Torch threads for CPU work unless ``--threads`` says otherwise. Measured on a 2-core machine
(60 toy evaluations; 10 of a random 25 M Mixtral): alone, 2 threads are 1.14x faster on the toy
(2.2 s vs 2.5 s) and 1.5x on the 25 M model (3.8 s vs 5.8 s); with a second such process on the
same cores, 2 threads each take 20 s where 1 thread each takes 2.7 s. Torch's own default (a thread
per core) spins waiting for cores another process holds, so one thread is the safe default and
``--threads N`` the choice for a machine to oneself. Ray's CPU actors use one thread each."""


def resolve_path(path: str) -> str:
    """``toy`` / ``toy-qwen`` → a packaged toy model's directory; other values are returned unchanged."""
    if path == "toy":
        from eep.toy import TOY_DIR

        if not (TOY_DIR / "model.safetensors").exists():
            raise EepError(
                f"the embedded toy model is missing from {TOY_DIR}; rebuild it with `eep toy build`"
            )
        return str(TOY_DIR)
    if path == "toy-qwen":
        from eep.toy_qwen import TOY_QWEN_DIR

        if not (TOY_QWEN_DIR / "model.safetensors").exists():
            raise EepError(
                f"the toy-qwen model is missing from {TOY_QWEN_DIR}; rebuild it with `eep toy build --which qwen`"
            )
        return str(TOY_QWEN_DIR)
    return path


def _looks_local(path: str) -> bool:
    """Not a hub id (``org/name``): a path that exists, starts like one, has no or several ``/``,
    or lies in a local directory (``out/nope``: ``out`` is here)."""
    return (
        path.startswith((".", "/", "~"))
        or Path(path).exists()
        or path.count("/") != 1
        or Path(path).parent.is_dir()
    )


def _check_exists(path: str) -> None:
    if _looks_local(path) and not Path(path).is_dir():
        parent = Path(path).parent
        why = (
            f" ({parent}/ is a local directory, so it is not taken for a hub id)"
            if path.count("/") == 1 and parent.is_dir() and not path.startswith((".", "/", "~"))
            else ""
        )
        raise EepError(
            f"model path {path} does not exist{why}; give a model directory, a hub id, or 'toy'"
        )


def load_hf_config(cfg: ModelConfig, prefer_file: bool = False):
    """The model's ``transformers`` config (no weights): local dir or hub; ``config_file`` when
    ``prefer_file`` (dry runs) or when the model's own config cannot be reached."""
    from transformers import AutoConfig

    path = resolve_path(cfg.path)
    _check_exists(path)
    if prefer_file and cfg.config_file:
        return _config_from_file(Path(cfg.config_file))
    try:
        return AutoConfig.from_pretrained(path)
    except (OSError, ValueError):
        if cfg.config_file:
            return _config_from_file(Path(cfg.config_file))
        import os

        offline = os.environ.get("HF_HUB_OFFLINE", "") not in ("", "0")
        where = (
            "the hub is off (HF_HUB_OFFLINE is set), so only local files count"
            if offline
            else "neither a local directory nor a hub model this machine can reach"
        )
        raise EepError(
            f"cannot read the config of model {path!r}: {where}; check the path or hub id, or set "
            "model.config_file to a local config.json"
        ) from None


def _config_from_file(file: Path):
    from transformers import AutoConfig

    if not file.exists():
        raise EepError(f"model.config_file {file} does not exist")
    try:
        data = json.loads(file.read_text())
        return AutoConfig.for_model(data.pop("model_type"), **data)
    except (json.JSONDecodeError, KeyError, ValueError) as err:
        raise EepError(f"model.config_file {file} is not a model config.json ({err})") from None


def pick_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise EepError(
            f"model.device {device!r} is not a device; use auto, cpu, cuda or cuda:N"
        ) from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise EepError(f"model.device is {device!r} but no CUDA GPU is visible; use auto or cpu")
    return dev


def pick_dtype(dtype: str, device: torch.device) -> torch.dtype:
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return getattr(torch, dtype)


def registered_experts() -> tuple[str, ...]:
    """The experts implementations this ``transformers`` registers (``eager`` is always there)."""
    from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS

    return ("eager", *ALL_EXPERTS_FUNCTIONS.keys())


@functools.cache
def grouped_mm_runs(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether torch has a grouped matmul kernel for ``dtype`` on ``device``. Tried on a tiny
    input rather than read from versions: support depends on the torch build, the GPU's compute
    capability and the dtype, and transformers' grouped_mm silently loops over experts without it."""
    mm = getattr(torch.nn.functional, "grouped_mm", None) or getattr(torch, "_grouped_mm", None)
    if mm is None:
        return False
    x = torch.ones(2, 16, device=device, dtype=dtype)
    weight = torch.ones(2, 16, 16, device=device, dtype=dtype)
    try:
        mm(x, weight, offs=torch.tensor([1, 2], dtype=torch.int32, device=device))
    except (RuntimeError, NotImplementedError, TypeError):
        return False
    return True


def choose_experts(choice: str, device: torch.device, dtype: torch.dtype) -> str:
    """The experts implementation ``transformers`` runs the MoE layers with (``model.experts_implementation``).

    ``auto``: ``grouped_mm`` where torch has a grouped matmul for this device and dtype, else
    ``eager``. Never ``batched_mm``: it gathers a copy of each selected expert's weights per
    (token, expert) pair, 3*h*i*4 bytes = 42 MiB each at hidden 1024 / intermediate 3584 (Mixtral
    width: 7-14 GiB per batch, a CUDA OOM), and is the slowest. Measured on 2 CPU cores (1 thread,
    torch 2.13, transformers 5.24, fp32, medians of 5-9), forward of a batch / greedy generate of
    8 tokens, eager vs grouped_mm vs batched_mm:
    - toy (hidden 64, 4 layers), 128 prompts: forward 25 / 25 / 804 ms, generate 83 / 68 / 1223 ms;
    - random Mixtral (hidden 1024, intermediate 3584, 8 experts, 2 layers, 730 MB), 32 prompts:
      forward 457 / 451 ms, generate 1.31 / 1.19 s; 4 prompts: forward 115 / 117 / 9072 ms,
      generate 0.46 / 0.45 / 15.1 s, peak RSS 1.75 / 1.75 / 5.0 GiB.
    grouped_mm is never slower than eager and ~10 % faster in generation; the names are checked
    against what this transformers registers, not its version."""
    registered = registered_experts()
    if choice == "auto":
        return (
            "grouped_mm"
            if "grouped_mm" in registered and grouped_mm_runs(device, dtype)
            else "eager"
        )
    if choice not in registered:
        raise EepError(
            f"model.experts_implementation {choice!r} is not in this transformers (it has "
            f"{', '.join(registered)}); set it to auto or eager"
        )
    if choice == "grouped_mm" and not grouped_mm_runs(device, dtype):
        raise EepError(
            f"model.experts_implementation is grouped_mm but torch {torch.__version__} has no grouped matmul "
            f"for {str(dtype).removeprefix('torch.')} on {device.type}; set it to auto or eager"
        )
    return choice


def load_model(cfg: ModelConfig):
    """(model in eval mode on its device, tokenizer with left padding). Also loads eep's own
    custom-form exports (see :mod:`eep.remote`) without ``trust_remote_code``. Every MoE model
    eep scores or exports is loaded here, so each runs the experts implementation of
    :func:`choose_experts`."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from eep.remote import register

    register()
    path = resolve_path(cfg.path)
    _check_exists(path)
    device = pick_device(cfg.device)
    dtype = pick_dtype(cfg.dtype, device)
    experts = choose_experts(cfg.experts_implementation, device, dtype)
    try:  # before the weights: a directory saved without its tokenizer fails in a second, not after loading
        tokenizer = AutoTokenizer.from_pretrained(path)
    except Exception as err:  # noqa: BLE001  (tokenizer conversion raises anything)
        raise EepError(
            f"model {path!r} has no usable tokenizer ({type(err).__name__}); save it beside the weights "
            "(tokenizer.save_pretrained(DIR)) or give the source model's directory"
        ) from None
    if device.type == "cuda" and device.index is None and torch.cuda.device_count() > 1:
        # a model larger than one GPU (e.g. a Ray actor holding several): accelerate spreads it
        model = AutoModelForCausalLM.from_pretrained(
            path, dtype=dtype, device_map="auto", experts_implementation=experts
        ).eval()
    else:
        model = (
            AutoModelForCausalLM.from_pretrained(path, dtype=dtype, experts_implementation=experts)
            .to(device)
            .eval()
        )
    keep_experts_kernel(model)
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer


def keep_experts_kernel(model) -> None:
    """Keep the experts kernel eep chose for ``model`` through ``generate``'s decode steps too.

    On any device but a CPU, ``transformers``' ``generate`` swaps ``grouped_mm`` for ``batched_mm``
    while it decodes (``_optimize_model_for_decode``; in 5.17 and 5.24 at least). ``batched_mm``
    gathers a copy of the selected experts' weights for every (token, expert) pair, so at Mixtral
    width a decode step of 128 prompts copies ~90 GiB per layer: measured on an H200 (torch 2.11,
    transformers 5.17, 2 Mixtral-8x7B layers, bf16), 122 ms a step against 1.5 ms to read the
    weights once, 27 GiB peak for a 5.4 GiB model at batch 32, and an out-of-memory error on smaller
    cards. The swap is a method of the model, so it is replaced on this instance only."""
    if hasattr(model, "_optimize_model_for_decode"):
        model._optimize_model_for_decode = contextlib.nullcontext


def estimate_bytes(hf_config, cfg: ModelConfig) -> int:
    """Bytes of weights of one model copy in the run's dtype, counted on the meta device."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(hf_config)
    # the device the run would use, without requiring it to exist here (dry runs of GPU configs)
    gpu = cfg.device.startswith("cuda") or (cfg.device == "auto" and torch.cuda.is_available())
    dtype = pick_dtype(cfg.dtype, torch.device("cuda" if gpu else "cpu"))
    return sum(p.numel() for p in model.parameters()) * torch.finfo(dtype).bits // 8
