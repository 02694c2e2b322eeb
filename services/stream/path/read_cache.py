"""The shared read cache layer: a pass-through placeholder for now.

The cache service will own a shared cache of vdisk blocks (and boot-profile prefetch).
Until then the page cache of the layer files does the job; this layer marks the seam.
"""

from __future__ import annotations

from services.stream.path.backend import Layer


class ReadCache(Layer):
    """Passes everything to the version chain below."""
