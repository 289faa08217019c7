"""User-facing errors.

Every error a user can cause (a bad placement, config, preset file or option) is a
:class:`PlacementSearchError` whose message is one line naming the culprit: the file, the layer,
the key path or the value. The CLI prints that line on stderr and exits with code 2; library
callers catch it like any ``ValueError``.
"""

from __future__ import annotations


class PlacementSearchError(ValueError):
    """Base class: a one-line message naming the culprit."""

    def __init__(self, message: str) -> None:
        # Keep the message on one line whatever was interpolated into it.
        super().__init__(" ".join(str(message).split()))


class PlacementError(PlacementSearchError):
    """A placement that does not fit its search space."""


class ConfigError(PlacementSearchError):
    """A malformed Apriel2 ``config.json`` (the message names the key path)."""


class PresetError(PlacementSearchError):
    """A preset file that does not follow the schema or contradicts itself."""


class InputFileError(PlacementSearchError):
    """A file that is missing, unreadable or not valid JSON/YAML."""
