"""txstream: a runner-portable Beam pipeline for card and payment transactions."""

__version__ = "0.1.0"
