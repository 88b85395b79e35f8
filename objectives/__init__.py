"""Training objectives (``orderlab.objectives``): set NLL, MDM NELBO, block NELBO."""

from . import likelihood  # noqa: F401  (fills the registry)
from .base import LossOutput, Objective
from .iwae import OrderDistribution, ProcessOrders, as_orders, iwae_bound, likelihood_table
from .likelihood import BlockNelbo, MDMNelbo, SetNLL

__all__ = [
    "LossOutput",
    "Objective",
    "SetNLL",
    "MDMNelbo",
    "BlockNelbo",
    "OrderDistribution",
    "ProcessOrders",
    "as_orders",
    "iwae_bound",
    "likelihood_table",
]
