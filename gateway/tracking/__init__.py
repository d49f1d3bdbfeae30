"""Open and click tracking rules: tokens, machine-vs-human classification, and the hits they make."""
