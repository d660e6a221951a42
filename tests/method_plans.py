"""Binding a method to plans in tests, as the trainer and the predictor do (Method.check_plan)."""
from __future__ import annotations

from typing import Any, Mapping

from samplan.methods.base import Method, MethodPlan


def bind(method: Method, plans: Mapping[str, Any], configuration: str | None = None) -> MethodPlan:
    """The method's checked plan for `configuration` (default: its first)."""
    return method.check_plan(plans, configuration)
