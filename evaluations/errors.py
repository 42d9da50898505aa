"""Error types of the evaluation package.

Every error is a ValueError subclass with a one-line message that names the problem and the fix,
so the CLI can print it as `error: ...` without a traceback.
"""
from __future__ import annotations


class EvaluationError(ValueError):
    """Base class: bad input to an evaluation; the message says what to do."""


class ImageDataError(EvaluationError):
    """Sample or reference images are missing, mis-shaped, of the wrong dtype or out of range."""


class WeightsError(EvaluationError):
    """Inception weights could not be found, verified or converted."""


class MetricInputError(EvaluationError):
    """A metric cannot be computed from what it was given (too few images, missing layer or statistics)."""
