"""The registry's domain: pure decisions over the projection (no I/O).

Each decision takes the current :class:`~services.registry.projection.Projection` and a
command's arguments and returns the events to append, or raises a
:class:`~services.registry.domain.errors.DomainError` naming the problem.
"""

from services.registry.domain.errors import DomainError

__all__ = ["DomainError"]
