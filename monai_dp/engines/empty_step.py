"""The output of a step whose Poisson batch was empty, in a form every MONAI handler and Ignite metric accepts.

An empty batch still takes a noise-only step (the privacy analysis assumes it), but it has no image, label,
prediction or loss. MONAI engines hand handlers a decollated list with one dict per item, in which the step's
scalars (the loss) are copied into every item; handlers read ``from_engine(["pred", "label"])`` (a list per key)
or ``from_engine(["loss"], first=True)`` / ``lambda x: x[0]`` (the first item). The empty step's output,
:class:`EmptyStepOutput`, is such a list with no items:

- ``from_engine(["pred", "label"])`` gives ``([], [])``: Ignite metrics (``Accuracy``) and MONAI metric handlers
  (``MeanDice``) update with nothing, so the epoch's value is that of the items actually trained on;
- its first entry holds no value: every key reads ``None``, and iterating it yields no key. ``StatsHandler``,
  ``TensorBoardStatsHandler`` and ``MLFlowHandler`` skip a ``None`` loss and an empty dict, so nothing is logged
  for the step (no NaN, no invented loss).

Batch-first tensors with zero rows would not do: MONAI's ``decollate_batch`` and ``MeanDice`` both fail on them.
"""

from __future__ import annotations

from typing import Any

__all__ = ["EmptyStepOutput", "NoValues"]


class NoValues(dict):
    """A dict with no entries in which every key reads ``None``: the scalars of a step that computed none."""

    def __missing__(self, key: Any) -> None:
        return None


class EmptyStepOutput(list):
    """``engine.state.output`` after an empty Poisson batch: a decollated output with no items.

    It iterates as an empty list (``len(output) == 0``); ``output[0]``, where MONAI's loggers read the step's
    replicated scalars, is a :class:`NoValues` (``output[0]["loss"] is None``). Any other index behaves as in a list.
    """

    def __getitem__(self, index: Any) -> Any:
        if not list.__len__(self) and isinstance(index, int) and index == 0:
            return NoValues()
        return super().__getitem__(index)
