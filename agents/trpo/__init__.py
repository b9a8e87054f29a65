from .trpo import TRPO

__all__ = ["TRPO"]
