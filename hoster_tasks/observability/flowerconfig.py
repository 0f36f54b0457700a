"""Flower's configuration file (`celery flower --conf=<this file>`, set by hoster_tasks.observability.flower).

Flower executes it and takes every module-level name that is one of its options.
"""

from hoster_tasks.observability.flower import TASKS_COLUMNS, format_task

tasks_columns = TASKS_COLUMNS
__all__ = ["format_task", "tasks_columns"]
