"""The operator console: a web interface to the centre (docs/CONSOLE-API.md)."""
