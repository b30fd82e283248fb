"""Data sources. Importing any module of this package first loads `sources`, which registers the
built-in datasets; a module that imports `sources` itself (latents, prompts, ...) then finds it
complete, whichever of them a command imports first (`launch.precompute` imports `latents`)."""
from distill.data import sources as _sources  # noqa: F401  pylint: disable=unused-import
