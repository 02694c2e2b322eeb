"""The registry's application layer: commands and queries, shared by REST and NATS.

:class:`RegistryApp` is assembled here from one part per resource, each a mixin over
:class:`~services.registry.app.core.CommandCore` (the projection and the one way to change
it): devices (with their CHAP credentials and assignments), vdisks, sessions, admin API
tokens.
"""

from __future__ import annotations

from services.registry.app.core import replay
from services.registry.app.sessions import SessionCommands
from services.registry.app.tokens import ApiTokenCommands

__all__ = ["RegistryApp", "replay"]


class RegistryApp(SessionCommands, ApiTokenCommands):
    """Every command and query of the registry (REST routes and NATS handlers call these)."""
