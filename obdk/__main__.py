"""``python -m obdk ...`` is the ``obdk`` CLI (``python -m obdk env`` for bug reports)."""
import sys

from .cli import main

sys.exit(main())
