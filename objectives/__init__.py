"""Training objectives (``orderlab.objectives``): set NLL, MDM NELBO, block NELBO."""

from . import likelihood  # noqa: F401  (fills the registry)
from .base import LossOutput, Objective
from .likelihood import BlockNelbo, MDMNelbo, SetNLL

__all__ = ["LossOutput", "Objective", "SetNLL", "MDMNelbo", "BlockNelbo"]
