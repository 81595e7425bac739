"""eep: gradient-free evolutionary expert pruning and merging for Mixture-of-Experts models."""

from eep.api import Run, evaluate, resume, search
from eep.errors import EepError
from eep.genome import Genome

__all__ = ["EepError", "Genome", "Run", "evaluate", "resume", "search"]
__version__ = "0.1.0"
