"""Unit tests: one module or component at a time, in-process, without a network peer of their own."""
