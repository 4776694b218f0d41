"""The layer-streamed runtime: host budget and scratch stores, layer placement, the distributed reduce."""
