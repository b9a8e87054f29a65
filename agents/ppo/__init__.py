from agents.ppo.ppo import PPO

__all__ = ["PPO"]
