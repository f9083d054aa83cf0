"""Run code right before and right after every real optimizer step.

Lightning has no after-optimizer-step hook, and ``on_before_optimizer_step`` runs before
gradient clipping. The geometry callbacks need a point where gradients are final (after
clipping, after gradient accumulation) and a point right after ``optimizer.step()``; torch's
optimizer step pre- and post-hooks give exactly that, once per real step. A step that the AMP
grad scaler skips (inf / nan gradients) never calls ``optimizer.step()``, so neither hook
fires.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
from torch.utils.hooks import RemovableHandle


class OptimizerStepHooks:
    """Attach a ``pre`` and a ``post`` function to the steps of some optimizers.

    Args:
        pre: Called with no arguments once per ``optimizer.step()`` when gradients are final
            (accumulated, unscaled and clipped) and before the parameters change: right after
            Lightning's closure (forward, backward, clipping) when the step gets one.
        post: Called with no arguments after each ``optimizer.step()``.
    """

    def __init__(self, pre: Callable[[], None] | None, post: Callable[[], None] | None) -> None:
        self.pre = pre
        self.post = post
        self._handles: list[RemovableHandle] = []

    def attach(self, optimizers: Iterable[torch.optim.Optimizer]) -> None:
        """Register the hooks (idempotent: detaches earlier registrations first)."""
        self.detach()
        for optimizer in optimizers:
            optimizer = getattr(optimizer, "optimizer", optimizer)  # LightningOptimizer
            if self.pre is not None:
                self._handles.append(optimizer.register_step_pre_hook(self._run_pre))
            if self.post is not None:
                self._handles.append(optimizer.register_step_post_hook(self._run_post))

    def _run_pre(self, optimizer: torch.optim.Optimizer, args: tuple, kwargs: dict
                 ) -> tuple[tuple, dict] | None:
        """Torch calls this before ``step(closure)`` runs the closure; Lightning's closure
        does the forward, backward, ``on_before_optimizer_step`` and gradient clipping. So
        with a closure, ``pre`` runs right after it, where gradients are final."""
        assert self.pre is not None
        pre = self.pre
        # torch passes the bound call's positional arguments: (optimizer, [closure])
        closure = kwargs.get("closure", args[1] if len(args) > 1 else None)
        if closure is None:  # manual / fp16-scaler path: gradients are already final
            pre()
            return None

        def closure_then_pre() -> object:
            loss = closure()
            pre()
            return loss

        if "closure" in kwargs:
            return args, {**kwargs, "closure": closure_then_pre}
        return (args[0], closure_then_pre, *args[2:]), kwargs

    def _run_post(self, *_: object) -> None:
        assert self.post is not None
        self.post()

    def detach(self) -> None:
        """Remove the hooks."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    @property
    def attached(self) -> bool:
        """Whether hooks are registered."""
        return bool(self._handles)
