"""Admin commands over the core library (direct database access)."""

from __future__ import annotations
