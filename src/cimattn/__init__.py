"""cimattn: compute-in-memory attention for pre-trained language models.

The layers, top to bottom (each imports only from those above it):
config → physics → attention → models → data/eval → adapt → report → pipeline → cli.
"""

from cimattn.errors import CimattnError

__version__ = "0.1.0"
__all__ = ["CimattnError", "__version__"]
