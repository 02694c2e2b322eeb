"""`python -m services.registry`: run the registry (STREAMBOOT_NATS_URL, STREAMBOOT_DATABASE_URL)."""

from services.registry.service import main

main()
