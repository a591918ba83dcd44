"""Talos: secure messaging for software agents."""

from __future__ import annotations

from talos import errors
from talos.errors import TalosError

__all__ = ["TalosError", "errors"]

__version__ = "0.1.0"
