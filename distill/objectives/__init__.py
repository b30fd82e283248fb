"""Built-in objectives; importing this package registers them (one module per family)."""
from distill.objectives import denoise  # noqa: F401
