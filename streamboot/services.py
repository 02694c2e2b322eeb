"""The services `streamboot up` runs, in start order: its own module, free of the supervisor's
imports, because `streamboot up --help` shows them."""

SERVICES: tuple[str, ...] = ("registry", "stream", "cache", "boot")
