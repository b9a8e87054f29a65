from .nlpo import NLPO, NLPOPolicy, top_p_mask

__all__ = ["NLPO", "NLPOPolicy", "top_p_mask"]
