"""What a node serves to inference clients: its task's input and output tensors, and running them.

Classification tasks (``ClassificationTask``) answer with class probabilities (FP32) and the predicted
label (INT64). A task without ``output_specs``/``predict`` is served as its model's raw output, one FP32
tensor named ``output`` whose shape is read off one forward pass at start-up.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from gossipfl.learning.learner import Learner
from gossipfl.learning.task import OutputSpec, Task
from gossipfl.serving.oip import TensorSpec, datatype_of

BATCH = -1


@dataclass(frozen=True)
class Signature:
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]


def _spec(name: str, dtype: str, shape: tuple[int, ...]) -> TensorSpec:
    return TensorSpec(name, datatype_of(np.dtype(dtype)), (BATCH, *shape))


def _raw_output(task: Task, model: nn.Module) -> list[OutputSpec]:
    spec = task.input_spec
    x = torch.zeros((1, *spec.shape), dtype=getattr(torch, np.dtype(spec.dtype).name))
    with torch.no_grad():
        out = model.eval()(x.to(next(model.parameters()).device))
    return [OutputSpec("output", "float32", tuple(out.shape[1:]))]


def _custom(task: Task) -> bool:
    return hasattr(task, "output_specs") and hasattr(task, "predict")


def signature(task: Task, learner: Learner, num_classes: int) -> Signature:
    spec = task.input_spec
    if _custom(task):
        outs = task.output_specs(num_classes)
    else:
        outs = learner.with_served(lambda m: _raw_output(task, m))
    return Signature(
        (_spec(spec.name, spec.dtype, spec.shape),),
        tuple(_spec(o.name, o.dtype, o.shape) for o in outs),
    )


def predict(task: Task, learner: Learner, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Run the served model on one batch (called in a worker thread)."""
    x = torch.from_numpy(np.array(inputs[task.input_spec.name], dtype=task.input_spec.dtype)).to(learner.device)

    def run(model: nn.Module) -> dict[str, torch.Tensor]:
        if _custom(task):
            return task.predict(model, x)
        return {"output": model(x).float()}

    return {k: v.detach().cpu().numpy() for k, v in learner.with_served(run).items()}


def outputs_finite(task: Task, learner: Learner) -> bool:
    """Whether the served model answers an all-zero input with finite values: a model that does not is
    broken (diverged), whatever a client sends it."""
    spec = task.input_spec
    x = {spec.name: np.zeros((1, *spec.shape), dtype=spec.dtype)}
    return all(np.isfinite(v).all() for v in predict(task, learner, x).values() if v.dtype.kind == "f")
