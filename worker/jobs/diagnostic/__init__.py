"""``diagnostic``: exercises the whole loop without a model (tests, benchmarks, canaries)."""
