"""Tasks: data generators with their metrics (orderlab.tasks)."""
