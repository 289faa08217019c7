"""placement-search."""
from placement_search._version import __version__

__all__ = ["__version__"]
