"""How a candidate is scored: tasks (prompt → answer examples) and their metrics."""
