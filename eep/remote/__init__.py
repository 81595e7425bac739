"""The modeling file ``eep`` writes next to checkpoints that stock ``transformers`` cannot express.

The file is self-contained (torch + transformers only), because it is copied verbatim into the
export and loaded from there by ``from_pretrained(path, trust_remote_code=True)``. ``eep``'s own
loader imports the same classes from this package instead (see :func:`register`).
"""

from pathlib import Path

MODELING_FILE = Path(__file__).with_name("modeling_eep_moe.py")


def custom_classes(model_type: str) -> tuple[type, type]:
    """eep's (config, causal LM) classes for a source family's ``model_type``."""
    from eep.remote.modeling_eep_moe import CLASSES

    return CLASSES[model_type]


def register() -> None:
    """Make ``AutoModelForCausalLM`` load eep's custom-form checkpoints without remote code."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from eep.remote.modeling_eep_moe import CLASSES

    for config_class, model_class in CLASSES.values():
        try:
            AutoConfig.register(config_class.model_type, config_class)
            AutoModelForCausalLM.register(config_class, model_class)
        except ValueError:  # already registered in this process
            pass
