"""Open and click tracking: tokens, the public HTTP endpoint, machine-vs-human classification."""
