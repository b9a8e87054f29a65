from .rloo import RLOO, rloo_advantages

__all__ = ["RLOO", "rloo_advantages"]
