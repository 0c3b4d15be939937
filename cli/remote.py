"""Commands that run or talk to the HTTP service: serve, token, upload, download."""

from __future__ import annotations
