"""Modeling files ``eep`` writes next to checkpoints that stock ``transformers`` cannot express.

Each file here is self-contained (torch + transformers only), because it is copied verbatim into
the export and loaded from there by ``from_pretrained(path, trust_remote_code=True)``. ``eep``'s
own loader imports the same classes from this package instead (see :func:`register`).
"""

from pathlib import Path

MODELING_FILES = {"eep_mixtral": Path(__file__).with_name("modeling_eep_mixtral.py")}


def register() -> None:
    """Make ``AutoModelForCausalLM`` load eep's custom-form checkpoints without remote code."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from eep.remote.modeling_eep_mixtral import EepMixtralConfig, EepMixtralForCausalLM

    try:
        AutoConfig.register("eep_mixtral", EepMixtralConfig)
        AutoModelForCausalLM.register(EepMixtralConfig, EepMixtralForCausalLM)
    except ValueError:  # already registered in this process
        pass
