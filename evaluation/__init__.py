"""Evaluation: metrics, suites (datasets of edit requests) and lifelong protocols."""

from .suites import BuiltinSuite, Suite

__all__ = ["Suite", "BuiltinSuite"]
