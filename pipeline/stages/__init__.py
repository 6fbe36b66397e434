"""The pipeline's stages, one module each, each entered as `run(context, out, **settings)` (see plan.py)."""
