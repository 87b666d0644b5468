"""exposrd: a self-hosted reverse tunnel relay on Twisted."""

__version__ = "0.1.0"
