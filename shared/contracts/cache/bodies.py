"""The cache service's JSON request bodies as models (the subjects are in ``wire.py``).

Every handler parses its body through one of these before it reads a field: a body that
does not fit is refused ``invalid`` with the fields named (:func:`parse`), never half-read.
Unknown fields are ignored, so a newer sender's extra field does not break an older node.
"""

from __future__ import annotations

from typing import Any, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from shared.bus import RemoteError

# Keys, ids and names: bounded, so no error quotes a big input.
MAX_TEXT = 512
MAX_LAYERS = 4096


class Body(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True)


class WcOpen(Body):
    """``wc.open``: open (or find again) write cache ``key``."""

    key: str = Field(max_length=MAX_TEXT)
    size: int = Field(ge=0)
    session_id: str | None = Field(default=None, max_length=MAX_TEXT)
    kind: str = Field(default="server-disk", max_length=MAX_TEXT)
    persistence: str | None = Field(default=None, max_length=MAX_TEXT)
    vdisk: str | None = Field(default=None, max_length=MAX_TEXT)
    version: int | None = None
    mac: str | None = Field(default=None, max_length=MAX_TEXT)
    # False (``vdisk commit``): a key no node holds is an error, not a new empty cache.
    create: bool | None = None
    stream_node: str | None = Field(default=None, max_length=MAX_TEXT)
    stream_instance: str | None = Field(default=None, max_length=MAX_TEXT)
    # > 0: routed here by another cache node.
    hops: int = Field(default=0, ge=0)

    def meta(self) -> dict[str, Any]:
        """What the cache keeps about itself (its meta file, its owner record)."""
        return self.model_dump(
            include={"session_id", "vdisk", "version", "size", "kind", "persistence", "mac"}
        )


class WcMap(Body):
    """``wc.map``: the next page of a write cache's runs, from block ``from``."""

    model_config = ConfigDict(extra="ignore", frozen=True, populate_by_name=True)

    key: str = Field(max_length=MAX_TEXT)
    # Checked after the key (an unknown cache is named as such first).
    first: int | None = Field(default=None, alias="from", ge=0)


class BlockRead(Body):
    """``wc.read``: ``length`` bytes of a write cache from ``offset``."""

    key: str = Field(max_length=MAX_TEXT)
    offset: int = Field(ge=0)
    length: int = Field(ge=0)


class RcOpen(Body):
    """``rc.open``: a vdisk version's shared read cache."""

    key: str = Field(max_length=MAX_TEXT)
    vdisk: str = Field(max_length=MAX_TEXT)
    version: int
    store: str | None = Field(default=None, max_length=MAX_TEXT)  # None: local
    layers: list[str] | None = Field(default=None, max_length=MAX_LAYERS)
    size: int | None = Field(default=None, ge=0)

    @property
    def local(self) -> bool:
        """A local-store version: the stream node reads its files itself."""
        return self.store in (None, "local")

    def info(self) -> dict[str, Any]:
        """The version's record as the read cache keeps it (its version.json)."""
        return self.model_dump(include={"key", "vdisk", "version", "store", "layers", "size"})


class RcRead(RcOpen):
    """``rc.read``: blocks of a read cache, with the ``rc.open`` fields so a node that has
    not opened that version opens it at its first read."""

    vdisk: str | None = Field(default=None, max_length=MAX_TEXT)  # type: ignore[assignment]
    version: int | None = None  # type: ignore[assignment]
    offset: int = Field(ge=0)
    length: int = Field(ge=0)


B = TypeVar("B", bound=Body)


def parse(model: type[B], body: Any, what: str) -> B:
    """``body`` as ``model``, or a RemoteError ``invalid`` ("bad <what>: ...") naming the
    fields at fault, not their values: the input is the sender's."""
    try:
        return model.model_validate(body)
    except ValidationError as e:
        problems = "; ".join(
            f"{'.'.join(str(x) for x in err['loc'])[:100]}: {err['msg'][:200]}"
            for err in e.errors()[:5]
        )
        raise RemoteError(f"bad {what}: {problems}", "invalid") from None
