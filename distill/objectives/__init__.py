"""Built-in objectives; importing this package registers them (one module per family)."""
from distill.objectives import denoise  # noqa: F401
from distill.objectives import scm  # noqa: F401
from distill.objectives import dmd2  # noqa: F401
from distill.objectives import sid  # noqa: F401
from distill.objectives import vsd  # noqa: F401
from distill.objectives import lcm  # noqa: F401
from distill.objectives import progressive  # noqa: F401
from distill.objectives import guided  # noqa: F401
from distill.objectives import agd  # noqa: F401
from distill.objectives import consistency  # noqa: F401
from distill.objectives import ladd  # noqa: F401
