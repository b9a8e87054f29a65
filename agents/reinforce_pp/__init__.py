from .reinforce_pp import ReinforcePP, reinforce_pp_advantages

__all__ = ["ReinforcePP", "reinforce_pp_advantages"]
