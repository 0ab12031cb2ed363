"""Linear-recurrence and Aaren prefix scans: sequential references beside the parallel forms."""

from .parallel import AarenState, aaren_combine, aaren_scan, aaren_step, linear_scan
from .reference import aaren_scan_reference, linear_scan_reference

__all__ = [
    "AarenState",
    "aaren_combine",
    "aaren_scan",
    "aaren_scan_reference",
    "aaren_step",
    "linear_scan",
    "linear_scan_reference",
]
