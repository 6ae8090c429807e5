"""Helpers for tests that need torch (kept out of fakes.py, which the daemon tests import)."""

from __future__ import annotations

import torch


def assert_same(ours: object, theirs: object, where: str) -> None:
    """Nested dicts/lists of tensors equal bit for bit."""
    if isinstance(ours, torch.Tensor):
        assert isinstance(theirs, torch.Tensor) and torch.equal(ours, theirs), where
    elif isinstance(ours, dict):
        assert isinstance(theirs, dict) and ours.keys() == theirs.keys(), where
        for key in ours:
            assert_same(ours[key], theirs[key], f"{where}[{key!r}]")
    elif isinstance(ours, (list, tuple)):
        assert isinstance(theirs, (list, tuple)) and len(ours) == len(theirs), where
        for index, (a, b) in enumerate(zip(ours, theirs)):
            assert_same(a, b, f"{where}[{index}]")
    else:
        assert ours == theirs, where
