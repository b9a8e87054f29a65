from .ilql import ILQL

__all__ = ["ILQL"]
