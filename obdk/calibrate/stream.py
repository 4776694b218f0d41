"""The layer-streamed calibration (:func:`calibrate_streamed`)."""
from ..stream.sweep import STREAM_TYPES, BoundaryStore, StreamingUnsupportedError, calibrate_streamed  # noqa: F401

__all__ = ["calibrate_streamed", "StreamingUnsupportedError", "STREAM_TYPES", "BoundaryStore"]
