"""The byte ranges a session changed since its last acknowledged FLUSH.

What a cache node that was away may lack: the batches in flight when it went (lost with
it), and, had its machine restarted, whatever it had not fsynced. The stream node sends
these ranges again, as its mirror holds them then, once the node answers again
(``RemoteWriteCache``). A FLUSH takes the ranges it covers (:meth:`take`) and gives them
back when it fails (:meth:`give_back`).
"""

from __future__ import annotations

# Merge overlapping ranges when this many have piled up (a client writing for a long time
# without a FLUSH): the list stays bounded by the number of distinct runs written.
MERGE_AT = 4096


class Unflushed:
    def __init__(self) -> None:
        self._ranges: list[tuple[int, int]] = []  # (start, stop) in bytes
        self._merged_len = 0  # length of the list after the last merge

    def __bool__(self) -> bool:
        return bool(self._ranges)

    def add(self, offset: int, length: int) -> None:
        if length <= 0:
            return
        self._ranges.append((offset, offset + length))
        if len(self._ranges) >= max(MERGE_AT, 2 * self._merged_len):
            self._ranges = merge(self._ranges)
            self._merged_len = len(self._ranges)

    def take(self) -> list[tuple[int, int]]:
        """Every range so far, now covered by a FLUSH being sent."""
        taken, self._ranges, self._merged_len = self._ranges, [], 0
        return taken

    def give_back(self, ranges: list[tuple[int, int]]) -> None:
        """Ranges a FLUSH did not cover after all (it failed)."""
        self._ranges = merge(ranges + self._ranges)
        self._merged_len = len(self._ranges)

    def runs(self) -> list[tuple[int, int]]:
        """The ranges, merged and in order."""
        return merge(self._ranges)


def merge(ranges: list[tuple[int, int]]) -> list[tuple[int, int]]:
    out: list[tuple[int, int]] = []
    for a, b in sorted(ranges):
        if out and a <= out[-1][1]:
            if b > out[-1][1]:
                out[-1] = (out[-1][0], b)
        else:
            out.append((a, b))
    return out
