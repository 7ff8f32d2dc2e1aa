"""OSM strings as the engine reads them: bytes that are not valid UTF-8 (possible in a PBF,
never from the OSM API) read with U+FFFD instead of failing the whole pass."""

from __future__ import annotations

__all__ = ["undecodable_as_replacement"]


def undecodable_as_replacement(exc: UnicodeDecodeError) -> str:
    """The string pyosmium failed to decode, with U+FFFD for its bad bytes (the error holds
    the bytes)."""
    return bytes(exc.object).decode("utf-8", "replace")
