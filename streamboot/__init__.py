"""streamboot's CLI and embedded supervisor.

Modules the CLI loads on every run import their heavy dependencies inside the functions
that use them, so a command starts fast and pays only for what it touches.
"""
