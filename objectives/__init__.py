"""orderlab.objectives."""
