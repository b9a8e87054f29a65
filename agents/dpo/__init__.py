from .dpo import DPO

__all__ = ["DPO"]
