"""Where a vdisk's layer files may be: in that vdisk's own folder of its store, nowhere else.

A layer is named in the log (``VdiskVersionPublished.path``) by its store-relative path
``<vdisk>/<file>``, the file a plain name (no ``/``, no ``..``, not hidden). Every place that
turns such a name into a file to read checks it here, so that a forged or corrupt name can
never make a service read a file outside the vdisk's folder (``../../etc/shadow``, an
absolute path, a symlink in the folder pointing out of it).
"""

from __future__ import annotations

import os
import re
from pathlib import Path, PurePosixPath

# A layer's file name: what imports write (v1.raw, v2.map, v2.data), and no path syntax.
_FILE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,254}\Z")


class LayerPathError(ValueError):
    """A layer path that is not a plain file of its vdisk's own folder."""


def _plain(name: str) -> bool:
    return bool(_FILE_NAME.match(name)) and ".." not in name


def check_layer_name(vdisk: str, layer: str) -> str:
    """``layer`` as the log names it: ``<vdisk>/<plain file name>``; returns it, or raises."""
    folder, sep, name = layer.partition("/")
    if folder != vdisk or not sep or not _plain(name):
        raise LayerPathError(
            f"layer path {layer!r} is not a plain file name inside vdisk {vdisk!r}'s folder"
        )
    return layer


def check_layer_file(
    path: str | os.PathLike[str],
    vdisk: str,
    root: str | os.PathLike[str] | None = None,
    *,
    follow_links: bool = True,
) -> Path:
    """A layer to read, as a file path: ``<root>/<vdisk>/<file>`` (relative paths are taken
    from ``root``; without a root, any folder named after the vdisk), and once symbolic
    links are followed still a file of that folder (``follow_links=False``: a block-device
    store, whose layers are links to device nodes by design). Returns the path, or raises."""
    p = Path(path)
    if root is not None and not p.is_absolute():
        p = Path(root) / p
    folder = p.parent
    ok = folder.name == vdisk and _plain(p.name) and ".." not in p.parts
    if ok and root is not None:
        ok = folder.parent == Path(root)
    if ok and follow_links and p.is_absolute():
        ok = Path(os.path.realpath(p)).parent == Path(os.path.realpath(folder))
    if not ok:
        raise LayerPathError(f"layer {str(path)!r} is not a file of vdisk {vdisk!r}'s own folder")
    return p


def check_relative_layer(path: str, vdisk: str) -> str:
    """A layer path relative to a store's root (a remote store: FTP...), checked by its form
    only: ``<vdisk>/<file>``, never absolute, never climbing out."""
    pure = PurePosixPath(path)
    if pure.is_absolute() or len(pure.parts) != 2:
        raise LayerPathError(f"layer {path!r} is not a file of vdisk {vdisk!r}'s own folder")
    return check_layer_name(vdisk, str(pure))
