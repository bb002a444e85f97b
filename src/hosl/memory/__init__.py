"""Per-party memory: exact measurement (`measure`) and the analytic model (`analytic`)."""

from hosl.memory.analytic import MemoryEstimate, PartyEstimate, estimate, format_estimate
from hosl.memory.measure import PartyMeter, module_state_bytes, peak_rss_bytes, tensor_bytes

__all__ = [
    "MemoryEstimate",
    "PartyEstimate",
    "PartyMeter",
    "estimate",
    "format_estimate",
    "module_state_bytes",
    "peak_rss_bytes",
    "tensor_bytes",
]
