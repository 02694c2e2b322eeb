"""The web console: server-rendered pages over the registry's own application layer.

Pages are Jinja2 templates rendered in the registry's API process; htmx (shipped in
``static/``, no CDN, no build step) swaps fragments in place and listens to the live
stream (server-sent events, :mod:`.live`). Reads render what the REST routes return
(the same :class:`~services.registry.app.RegistryApp` calls); every change is a request to
the REST API itself, sent by ``static/console.js`` with the login's cookie and CSRF token,
so the gate's roles and audit trail apply to the console exactly as to the CLI.
docs/console.md says why this stack.
"""

from services.registry.console.live import LiveFeed
from services.registry.console.logins import Logins
from services.registry.console.pages import mount_console

__all__ = ["LiveFeed", "Logins", "mount_console"]
