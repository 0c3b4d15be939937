"""Aware UTC time, in one place so that every stored timestamp agrees."""

from __future__ import annotations

import datetime


def utcnow() -> datetime.datetime:
    # MongoDB stores milliseconds; truncate so a value reads back equal.
    now = datetime.datetime.now(datetime.timezone.utc)
    return now.replace(microsecond=now.microsecond // 1000 * 1000)


def aware(value: datetime.datetime) -> datetime.datetime:
    """pymongo returns naive UTC datetimes unless tz_aware; make them aware."""
    if value.tzinfo is None:
        return value.replace(tzinfo=datetime.timezone.utc)
    return value
