"""Finding and loading models: ``toy`` names the embedded toy, anything else is a local
directory or a hub id handed to ``transformers``."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from eep.config import ModelConfig
from eep.errors import EepError


def resolve_path(path: str) -> str:
    """``toy`` → the packaged toy model directory; other values are returned unchanged."""
    if path == "toy":
        from eep.toy import TOY_DIR

        if not (TOY_DIR / "model.safetensors").exists():
            raise EepError(f"the embedded toy model is missing from {TOY_DIR}; rebuild it with `eep toy build`")
        return str(TOY_DIR)
    return path


def _looks_local(path: str) -> bool:
    return path.startswith((".", "/", "~")) or Path(path).exists() or path.count("/") != 1


def load_hf_config(cfg: ModelConfig, prefer_file: bool = False):
    """The model's ``transformers`` config (no weights): local dir or hub; ``config_file`` when
    ``prefer_file`` (dry runs) or when the model's own config cannot be reached."""
    from transformers import AutoConfig

    path = resolve_path(cfg.path)
    if _looks_local(path) and not Path(path).is_dir():
        raise EepError(f"model path {path} does not exist; give a model directory, a hub id, or 'toy'")
    if prefer_file and cfg.config_file:
        return _config_from_file(Path(cfg.config_file))
    try:
        return AutoConfig.from_pretrained(path)
    except (OSError, ValueError) as err:
        if cfg.config_file:
            return _config_from_file(Path(cfg.config_file))
        raise EepError(f"cannot read the config of model {path!r} ({' '.join(str(err).split())[:200]}); "
                       "check the path or hub id, or set model.config_file to a local config.json") from None


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
        raise EepError(f"model.device {device!r} is not a device; use auto, cpu, cuda or cuda:N") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise EepError(f"model.device is {device!r} but no CUDA GPU is visible; use auto or cpu")
    return dev


def pick_dtype(dtype: str, device: torch.device) -> torch.dtype:
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return getattr(torch, dtype)


def load_model(cfg: ModelConfig):
    """(model in eval mode on its device, tokenizer with left padding). Also loads eep's own
    custom-form exports (see :mod:`eep.remote`) without ``trust_remote_code``."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from eep.remote import register

    register()
    path = resolve_path(cfg.path)
    device = pick_device(cfg.device)
    dtype = pick_dtype(cfg.dtype, device)
    if device.type == "cuda" and device.index is None and torch.cuda.device_count() > 1:
        # a model larger than one GPU (e.g. a Ray actor holding several): accelerate spreads it
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, device_map="auto").eval()
    else:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(device).eval()
    tokenizer = AutoTokenizer.from_pretrained(path)
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer


def estimate_bytes(hf_config, cfg: ModelConfig) -> int:
    """Bytes of weights of one model copy in the run's dtype, counted on the meta device."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(hf_config)
    # the device the run would use, without requiring it to exist here (dry runs of GPU configs)
    gpu = cfg.device.startswith("cuda") or (cfg.device == "auto" and torch.cuda.is_available())
    dtype = pick_dtype(cfg.dtype, torch.device("cuda" if gpu else "cpu"))
    return sum(p.numel() for p in model.parameters()) * torch.finfo(dtype).bits // 8
