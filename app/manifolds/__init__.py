"""Manifold math for geometry-aware LoRA: pure, batched tensor functions.

``stiefel`` holds the Stiefel manifold (``X^T X = I``), ``sphere`` the oblique manifold
(unit-norm columns), ``batching`` the helpers to run one batched op per shape group.
"""

from app.manifolds import sphere, stiefel
from app.manifolds.batching import apply_grouped, group_by_shape, stack_groups, unstack
from app.manifolds.stiefel import (
    compute_dtype,
    drift,
    landing_step,
    project_tangent,
    random_orthonormal,
    retract_exp,
    retract_polar,
    riemannian_grad,
    skew,
    sym,
)

__all__ = [
    "apply_grouped",
    "compute_dtype",
    "drift",
    "group_by_shape",
    "landing_step",
    "project_tangent",
    "random_orthonormal",
    "retract_exp",
    "retract_polar",
    "riemannian_grad",
    "skew",
    "sphere",
    "stack_groups",
    "stiefel",
    "sym",
    "unstack",
]
