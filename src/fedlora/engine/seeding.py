"""The engine's seeds: every random choice of a run derives from (run seed, purpose, round, client)."""

from __future__ import annotations

import zlib


def mix_seed(*parts: int | str) -> int:
    """A stable 31-bit seed from parts (Python's ``hash`` is salted per process)."""
    return zlib.crc32("/".join(str(p) for p in parts).encode()) & 0x7FFFFFFF
