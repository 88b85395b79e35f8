"""Training objectives (``orderlab.objectives``): set NLL, MDM NELBO, block NELBO, and the
policy-gradient objectives (REINFORCE, RLOO, GRPO) with their rewards (kind "reward"), and
variational order learning with pyro (vi_orders)."""

from . import likelihood, policy_gradient, rewards, vi  # noqa: F401  (fill the registry)
from .base import LossOutput, Objective, StepOutput
from .likelihood import BlockNelbo, MDMNelbo, SetNLL
from .policy_gradient import GRPO, RLOO, PolicyGradient, Reinforce, Rollout
from .rewards import NFEPenalty, Reward, StepDiscount, TaskScore
from .vi import VIOrders

__all__ = [
    "LossOutput", "StepOutput", "Objective", "SetNLL", "MDMNelbo", "BlockNelbo",
    "PolicyGradient", "Reinforce", "RLOO", "GRPO", "Rollout",
    "Reward", "TaskScore", "NFEPenalty", "StepDiscount", "VIOrders",
]
