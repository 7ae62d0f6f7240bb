"""dropgate: the update gate of an on-premise platform."""

__version__ = "0.1.0"
