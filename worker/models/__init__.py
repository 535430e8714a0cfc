"""Model loading: the catalog (no torch), the per-process cache, model-specific loaders, demo models."""
