"""kvgate's gateway: the server, its config and its command line."""

__version__ = "0.1.0"
