"""fastdiff: fast diffusion-model sampling with fused kernels, each proven against a reference.

Importing fastdiff never fails because the native extension is missing or stale: ops fall back
to the backends that can run (see ``fastdiff info``).
"""

from . import _native, ops, pipelines, reference
from .integrations.diffusers import patch, unpatch
from .sampling import sample
from .schedule import Schedule

# Every native op is a torch op from the start (torch.ops.fastdiff.<op>), not only once some op has
# loaded _C; after the ops' autograd registrations, which ride on the load. Silent and never failing.
_native.preload()

__version__ = "0.1.0"

__all__ = ["sample", "patch", "unpatch", "Schedule", "ops", "pipelines", "reference", "__version__"]
