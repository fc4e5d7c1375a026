"""One training loop for every model: ``python -m dalle3_fast.train CONFIG``.

See :mod:`.task` for how a task (model + data + loss) is defined and registered, :mod:`.config`
for the config format, :mod:`.checkpoint` for the checkpoint layout.
"""
from .config import ConfigError, OptimizerConfig, TrainConfig, load_config
from .loop import lr_at, train
from .task import TASKS, Task, TaskContext, register_task
from .tasks import resolve_task

__all__ = ["ConfigError", "OptimizerConfig", "TASKS", "Task", "TaskContext", "TrainConfig", "load_config", "lr_at",
           "register_task", "resolve_task", "train"]
