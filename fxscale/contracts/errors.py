"""The project's error type for bad input: what was wrong, where (file, line, field) and how
to fix it. No imports: every layer may raise it."""
from __future__ import annotations


class InputError(ValueError):
    """A file, field or argument fxscale cannot use; the message names where and why.

    A ValueError, so callers that catch ValueError keep working."""


class NoDeploymentError(ValueError):
    """No deployment of a policy meets the SLO at the asked rate (within the devices
    allowed); the message says which requests make it so and what to relax."""
