from .grpo import GRPO, grpo_advantages

__all__ = ["GRPO", "grpo_advantages"]
