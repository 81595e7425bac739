"""eep: gradient-free evolutionary expert pruning and merging for Mixture-of-Experts models."""

from eep.errors import EepError
from eep.genome import Genome

__all__ = ["EepError", "Genome"]
__version__ = "0.1.0"
