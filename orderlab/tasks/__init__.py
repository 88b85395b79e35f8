"""Tasks: data generators with their metrics (orderlab.tasks).

Importing this package registers every task (kind "task"): explicit imports, no scanning.
"""

from orderlab.tasks import addition, text
from orderlab.tasks.addition import Addition, pair_split
from orderlab.tasks.base import SPLITS, Task, exact_match
from orderlab.tasks.text import StdlibText, file_split, stdlib_files

__all__ = [
    "Task",
    "SPLITS",
    "exact_match",
    "Addition",
    "pair_split",
    "StdlibText",
    "stdlib_files",
    "file_split",
    "addition",
    "text",
]
