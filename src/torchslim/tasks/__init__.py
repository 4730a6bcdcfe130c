"""Tasks: what a model is trained and judged on (classification, language modeling, fidelity to the original,
or a user's own callables), and how batches and model outputs of every common shape are read."""

from torchslim.tasks.base import TASKS, CustomTask, Task, get_task, resolve_task
from torchslim.tasks.batches import batch_targets, call_model, example_of, model_inputs, move_to, output_tensor
from torchslim.tasks.classification import ClassificationTask
from torchslim.tasks.fidelity import FidelityTask
from torchslim.tasks.language import LanguageModelingTask

__all__ = [
    "TASKS",
    "ClassificationTask",
    "CustomTask",
    "FidelityTask",
    "LanguageModelingTask",
    "Task",
    "batch_targets",
    "call_model",
    "example_of",
    "get_task",
    "model_inputs",
    "move_to",
    "output_tensor",
    "resolve_task",
]
