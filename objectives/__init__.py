"""Training objectives (``orderlab.objectives``): set NLL, MDM NELBO, block NELBO,
GenMD4's NELBO with a learned schedule, the importance-weighted bound over orders."""

from . import likelihood  # noqa: F401  (fills the registry)
from .base import LossOutput, Objective
from .genmd4 import GenMD4Nelbo, learned_parts
from .iwae import OrderDistribution, ProcessOrders, as_orders, iwae_bound, likelihood_table
from .likelihood import BlockNelbo, MDMNelbo, SetNLL

__all__ = [
    "LossOutput",
    "Objective",
    "SetNLL",
    "MDMNelbo",
    "BlockNelbo",
    "GenMD4Nelbo",
    "learned_parts",
    "OrderDistribution",
    "ProcessOrders",
    "as_orders",
    "iwae_bound",
    "likelihood_table",
]
