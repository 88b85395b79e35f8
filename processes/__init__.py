"""Forward-noise processes and hyperschedules (orderlab.processes; DESIGN.md section 3).

A process gives every position its own masking schedule ``α_i(t)``; first-hitting times,
orders (``sample_ranks``) and corrupted inputs (``corrupt``) follow from it. Importing
this package registers every process (kind "process") and corruption (kind
"corruption"): explicit imports, no scanning.
"""

from orderlab.processes import base, compose, corruption, flat, learned, scheduler, windowed
from orderlab.processes.base import Process
from orderlab.processes.compose import Blockwise, Mixture
from orderlab.processes.corruption import Absorbing, Corruption, Hybrid, Uniform, as_corruption
from orderlab.processes.flat import Cosine, Flat, Linear, LogLinear, Polynomial
from orderlab.processes.learned import LearnedPositionSchedule, LearnedTokenSchedule, Powers, PowerSchedule
from orderlab.processes.scheduler import DataSchedule, MixerScheduler, PositionalScheduler, Scheduler
from orderlab.processes.windowed import Quench, SlidingWindow, Staggered, Windowed

__all__ = [
    "Process",
    "Flat",
    "Linear",
    "Cosine",
    "LogLinear",
    "Polynomial",
    "Windowed",
    "Staggered",
    "SlidingWindow",
    "Quench",
    "Blockwise",
    "Mixture",
    "PowerSchedule",
    "Powers",
    "LearnedPositionSchedule",
    "LearnedTokenSchedule",
    "Scheduler",
    "PositionalScheduler",
    "MixerScheduler",
    "DataSchedule",
    "Corruption",
    "Absorbing",
    "Uniform",
    "Hybrid",
    "as_corruption",
    "base",
    "compose",
    "corruption",
    "flat",
    "learned",
    "scheduler",
    "windowed",
]
