"""What fusion preserved: output errors and empirical neural tangent kernels (Adam and SGD), per method."""

from .compare import compare_methods
from .kernels import empirical_kernels, kernel_error, scalar_outputs
from .outputs import output_errors

__all__ = ["compare_methods", "empirical_kernels", "kernel_error", "output_errors", "scalar_outputs"]
