"""iceaggr: DOM-level pulse aggregation for IceCube — data, collate, attention backends, benchmarks.

See ``iceaggr_lib.collate`` for the packed batch layout every part of the library shares.
"""

from iceaggr_lib.collate import DomBatch, PulseTable, collate_events

__all__ = ["DomBatch", "PulseTable", "collate_events"]
__version__ = "0.1.0"
