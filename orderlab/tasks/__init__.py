"""Tasks: data generators with their metrics (orderlab.tasks).

Importing this package registers every task (kind "task"): explicit imports, no scanning.
"""

from orderlab.tasks import addition, chain, jsonl, sat, stargraph, sudoku, text
from orderlab.tasks.addition import Addition, pair_split
from orderlab.tasks.base import (
    SPLITS,
    Task,
    exact_match,
    hash_rows,
    hash_split,
    position_accuracy,
    sample_split,
    token_accuracy,
)
from orderlab.tasks.chain import Chain, permutation_table
from orderlab.tasks.jsonl import JsonlTask
from orderlab.tasks.sat import PlantedSAT, PlantedSATGrid
from orderlab.tasks.stargraph import StarGraph
from orderlab.tasks.sudoku import Sudoku, SudokuSolver
from orderlab.tasks.text import Infill, StdlibText, file_split, stdlib_files

__all__ = [
    "Task",
    "SPLITS",
    "exact_match",
    "token_accuracy",
    "position_accuracy",
    "hash_rows",
    "hash_split",
    "sample_split",
    "Chain",
    "permutation_table",
    "Addition",
    "pair_split",
    "StarGraph",
    "Sudoku",
    "SudokuSolver",
    "StdlibText",
    "Infill",
    "stdlib_files",
    "file_split",
    "JsonlTask",
    "PlantedSAT",
    "PlantedSATGrid",
    "addition",
    "chain",
    "jsonl",
    "sat",
    "stargraph",
    "sudoku",
    "text",
]
