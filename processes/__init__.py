"""orderlab.processes."""
