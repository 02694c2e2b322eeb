"""The wire formats of the services: subjects, bodies, key formats and the client stubs
other processes call. Modules here depend only on ``shared``."""
