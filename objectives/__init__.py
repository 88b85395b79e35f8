"""Training objectives (``orderlab.objectives``): set NLL, MDM NELBO, block NELBO, GenMD4's
NELBO with a learned schedule, AOP's policy-reweighted MDM loss, LoMDM's NELBO with data-dependent schedules, the policy-gradient objectives (REINFORCE, RLOO, GRPO) with
their rewards (kind "reward"), SAS (GRPO with per-step rewards, kind "step_reward"),
variational order learning with pyro (vi_orders), and the
importance-weighted bound over orders."""

from . import aop, genmd4, likelihood, lomdm, policy_gradient, rewards, sas, vi  # noqa: F401  (fill the registry)
from .aop import AOP
from .base import LossOutput, Objective, StepOutput
from .genmd4 import GenMD4Nelbo, learned_parts
from .lomdm import LoMDMNelbo
from .iwae import OrderDistribution, ProcessOrders, as_orders, iwae_bound, likelihood_table
from .likelihood import BlockNelbo, MDMNelbo, SetNLL
from .policy_gradient import GRPO, RLOO, PolicyGradient, Reinforce, Rollout
from .rewards import (
    NFEPenalty, PathwiseLikelihood, Reward, StepDiscount, StepReward, TaskScore, position_log_probs, returns_to_go,
)
from .sas import SAS, step_advantages, teacher_forced
from .vi import VIOrders

__all__ = [
    "LossOutput", "StepOutput", "Objective", "SetNLL", "MDMNelbo", "BlockNelbo",
    "GenMD4Nelbo", "learned_parts", "LoMDMNelbo",
    "PolicyGradient", "Reinforce", "RLOO", "GRPO", "Rollout",
    "Reward", "TaskScore", "NFEPenalty", "StepDiscount",
    "StepReward", "PathwiseLikelihood", "position_log_probs", "returns_to_go", "SAS", "step_advantages", "teacher_forced",
    "OrderDistribution", "ProcessOrders", "as_orders", "iwae_bound", "likelihood_table",
    "VIOrders", "AOP",
]
