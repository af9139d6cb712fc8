"""cbkernels: fused class-balanced losses (Cui et al., CVPR 2019) for PyTorch.

Importing this package never imports Triton, builds anything or touches a GPU; compiled backends load
on first use (and are compiled then when the installed package has none for this torch: ``_extension``).
See docs/spec.md for what every loss computes.
"""

import sys as _sys

from . import (
    _torch_backend,  # noqa: F401  (registers the pure-PyTorch backend's op kernels)
    metrics,  # noqa: F401  (cbkernels.metrics: long-tail accuracy)
)
from ._backends import available_backends
from ._version import __version__
from .linear_loss import LinearClassBalancedLoss, linear_cb_loss
from .losses import (
    ClassBalancedLoss,
    cb_focal,
    cb_sigmoid_cross_entropy,
    cb_softmax_cross_entropy,
    cb_softmax_focal,
    class_balanced_loss,
)
from .training import ClassCounter, distributed_normalizer
from .weights import beta_from_num_samples, class_balanced_weights, effective_number, ldam_margins, logit_adjustment

__all__ = [
    "__version__",
    "ClassBalancedLoss",
    "ClassCounter",
    "LinearClassBalancedLoss",
    "available_backends",
    "beta_from_num_samples",
    "cb_focal",
    "cb_sigmoid_cross_entropy",
    "cb_softmax_cross_entropy",
    "cb_softmax_focal",
    "class_balanced_loss",
    "class_balanced_weights",
    "distributed_normalizer",
    "effective_number",
    "ldam_margins",
    "linear_cb_loss",
    "logit_adjustment",
]

# `import cbkernels.cb_focal` works and leaves `cbkernels.cb_focal` the function: the import system
# finds the name in sys.modules and binds it on the package as it is.
for _name in ("cb_focal", "cb_softmax_cross_entropy", "cb_sigmoid_cross_entropy", "cb_softmax_focal",
              "class_balanced_loss", "linear_cb_loss"):
    _sys.modules[f"{__name__}.{_name}"] = globals()[_name]
del _name
