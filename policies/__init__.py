"""orderlab.policies: set-selection policies for decoding (DESIGN.md section 5).

A policy is a candidate rule, a score and a count rule; the literature's samplers are
registered presets (kind "policy"). Importing this package fills the registry.
"""

from .base import Policy, PolicyError, StepView
from .compose import (
    All, Block, CandidateRule, Composed, Count, EntropyBound, EvenSplit, Factor, First, KFromSchedule, Last, Ranked,
    Threshold, TopK, Window, rank_candidates, take_prefix,
)
from .scores import (
    Confidence, Gumbel, Margin, NegEntropy, PCScore, PositionPrior, Scaled, Score, Sum, Uniform, score_from,
)
from .presets import (
    ConfidenceThreshold, EBSampler, FactorRule, LeftToRight, LowEntropy, PCSampler, RightToLeft, SemiAR,
    SlidingWindow, TopMargin, TopProb,
)
from .stochastic import BernoulliPolicy, PlackettLuce, PlackettLucePolicy, RandomPolicy
from .schedule import ScheduleSampler
from .reverse_schedule import ReverseSchedule
from .sets import NonEmptyBernoulli, OrderedPlackettLuce, PlackettLuceTopK, SetDistribution, rank_random_ties
from .learned import (
    FEATURES, WIDE_FEATURES, Features, LearnedBernoulli, LearnedPlackettLuce, DCoLTPolicy, LearnedPolicy, LinearNet, MLPNet, PolicyNet, Replay,
    Trajectory, TransformerNet,
)

__all__ = [
    "Policy", "PolicyError", "StepView",
    "CandidateRule", "All", "Block", "Window", "First", "Last",
    "Score", "Confidence", "Margin", "NegEntropy", "PositionPrior", "Uniform", "Gumbel", "PCScore", "Sum", "Scaled",
    "score_from",
    "Count", "TopK", "KFromSchedule", "EvenSplit", "Threshold", "Factor", "EntropyBound", "Ranked", "rank_candidates", "take_prefix",
    "Composed",
    "RandomPolicy", "LeftToRight", "RightToLeft", "SemiAR", "TopProb", "TopMargin", "LowEntropy",
    "ConfidenceThreshold", "FactorRule", "EBSampler", "PCSampler", "SlidingWindow", "ScheduleSampler", "ReverseSchedule",
    "PlackettLuce", "PlackettLucePolicy", "BernoulliPolicy",
    "SetDistribution", "NonEmptyBernoulli", "PlackettLuceTopK", "OrderedPlackettLuce", "rank_random_ties",
    "FEATURES", "WIDE_FEATURES", "Features", "PolicyNet", "LinearNet", "MLPNet", "TransformerNet", "Trajectory", "Replay",
    "LearnedPolicy", "LearnedBernoulli", "LearnedPlackettLuce", "DCoLTPolicy",
]
