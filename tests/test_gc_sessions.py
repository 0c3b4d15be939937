"""gc and fsck never take a live writer session's bytes for orphans; gc reclaims idle ones."""

from __future__ import annotations

import time
from typing import Any

from pymongo.database import Database

from catalog import ManagedStorage
from catalog.driver import StorageDriver
from catalog.fsck import fsck
from catalog.gc import gc
from tests.helpers import rand


def test_closed_session_survives_gc_and_fsck_until_it_expires(
    managed: ManagedStorage, db: Database[Any]
) -> None:
    driver = StorageDriver(managed, "e")
    data = rand(3 * 1024 * 1024 + 5)
    writer = driver.writer("/layer/data")
    writer.write(data)
    writer.close()  # kept, uncommitted: its chunks have no files document yet
    assert db["resources.chunks"].count_documents({}) >= 3

    report = gc(managed, grace=0)
    assert report.orphan_chunks == 0 and report.sessions_reclaimed == 0
    assert fsck(managed, grace=0).clean
    resumed = driver.writer("/layer/data", append=True)
    assert resumed.size() == len(data)
    resumed.close()
    time.sleep(0.05)  # untouched for longer than max_age = 0

    report = gc(managed, grace=0, session_max_age=0)  # idle for longer than 0 s: reclaimed
    assert report.sessions_reclaimed == 1
    assert db["resources.chunks"].count_documents({}) == 0
    assert fsck(managed, grace=0).clean
    assert driver.list("/") == []


def test_gc_reclaims_expired_ttl_keys(managed: ManagedStorage, db: Database[Any]) -> None:
    from catalog.kv import KVStore

    kv = KVStore(managed, "e")
    kv.put("short", b"lived" * 20000, ttl=0.5)  # above the inline limit: a GridFS file
    kv.close()  # nobody renews it any more
    time.sleep(0.8)
    assert not kv.exists("short")
    assert db["paths"].count_documents({}) == 1  # expired, not yet reclaimed
    report = gc(managed, grace=0)
    assert report.expired_keys == 1
    assert db["paths"].count_documents({}) == 0
    assert db["resources.files"].count_documents({}) == 0
    assert fsck(managed, grace=0).clean
