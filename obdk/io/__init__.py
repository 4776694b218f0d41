"""obdk checkpoints: the format, the atomic save, the writer and the checked load."""
from .writer import *  # noqa: F401,F403
from .writer import _read_config_json, _sources_of, _tensors_for_save, _tied_names  # noqa: F401
