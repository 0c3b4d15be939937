"""A real MongoDB for every test: a throwaway single-node replica set.

Started once per session from the same launcher the embedded default uses, on
a fresh dbpath and a free loopback port, and deleted afterwards. Set
RESCAT_TEST_MONGO_URI to run against a server of your own instead. Each test
gets a database of its own, dropped after the test.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from pymongo import MongoClient
from pymongo.database import Database

from catalog import ManagedStorage
from catalog.mongod import throwaway
from storage import GridFSStorage


@pytest.fixture(scope="session")
def mongo_uri() -> Iterator[str]:
    with throwaway("RESCAT_TEST_MONGO_URI") as uri:
        yield uri


@pytest.fixture(scope="session")
def mongo_client(mongo_uri: str) -> Iterator[MongoClient[Any]]:
    client: MongoClient[Any] = MongoClient(mongo_uri, tz_aware=True)
    yield client
    client.close()


@pytest.fixture
def db(mongo_client: MongoClient[Any]) -> Iterator[Database[Any]]:
    name = f"t_{uuid.uuid4().hex[:12]}"
    yield mongo_client[name]
    mongo_client.drop_database(name)


@pytest.fixture
def database(mongo_client: MongoClient[Any]) -> Iterator[str]:
    """The name of a database of its own, for a `rescat` process started by the test."""
    name = f"t_{uuid.uuid4().hex[:12]}"
    yield name
    mongo_client.drop_database(name)


@pytest.fixture
def gridfs_storage(db: Database[Any]) -> GridFSStorage:
    return GridFSStorage(db)


@pytest.fixture
def managed(db: Database[Any], gridfs_storage: GridFSStorage) -> ManagedStorage:
    return ManagedStorage(db, gridfs_storage)


@pytest.fixture
def env(mongo_uri: str, db: Database[Any], tmp_path: Path) -> dict[str, str]:
    """The environment of a real `rescat` process on the test database, no config file."""
    base = {k: v for k, v in os.environ.items() if not k.startswith("RESCAT_")}
    return {
        **base,
        "RESCAT_MONGO_URI": mongo_uri,
        "RESCAT_DATABASE": db.name,
        "RESCAT_CONFIG": str(tmp_path / "no-config.toml"),
    }
