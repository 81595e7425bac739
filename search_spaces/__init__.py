"""What a genome means: pruning keep sets (this package grows merge matrices, top-k, budgets)."""

from search_spaces.prune import PruneSpace, crossover_rows, mutate_swap, random_genome

__all__ = ["PruneSpace", "crossover_rows", "mutate_swap", "random_genome"]
