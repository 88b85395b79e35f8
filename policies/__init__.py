"""orderlab.policies."""
