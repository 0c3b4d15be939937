"""An environment-scoped view of ManagedStorage: what a tenant's code holds."""

from __future__ import annotations

from typing import TYPE_CHECKING, BinaryIO

from catalog.names import check_env
from catalog.proof import PutResponse, RequestResponse, new_put_response
from catalog.resources import Resource
from catalog.streams import binary_source

if TYPE_CHECKING:
    from catalog.kv import KVStore
    from catalog.managed import ManagedStorage, PathInfo


class Environment:
    """Every operation of ManagedStorage, bound to one environment."""

    def __init__(self, managed: ManagedStorage, env_uuid: str) -> None:
        self.managed = managed
        self.env_uuid = check_env(env_uuid)

    def put(
        self,
        path: str,
        reader: BinaryIO | bytes | bytearray | memoryview,
        length: int = -1,
        check_hash: str | None = None,
    ) -> Resource:
        """Store `reader`'s bytes at `path`: a binary reader, or the bytes themselves.

        Bytes are taken as `CatalogClient.put` and httpx take them; a `str` is
        refused (which encoding?), as is a file opened in text mode.
        """
        reader, length = binary_source(reader, length)
        return self.managed.put_for_environment_and_check_hash(
            self.env_uuid, path, reader, length, check_hash
        )

    def get(self, path: str) -> tuple[BinaryIO, int]:
        return self.managed.get_for_environment(self.env_uuid, path)

    def remove(self, path: str) -> None:
        self.managed.remove_for_environment(self.env_uuid, path)

    def move(self, src: str, dst: str) -> PathInfo:
        return self.managed.move_for_environment(self.env_uuid, src, dst)

    def stat(self, path: str) -> PathInfo:
        return self.managed.stat_for_environment(self.env_uuid, path)

    def list(self, prefix: str = "") -> list[str]:
        return self.managed.list_for_environment(self.env_uuid, prefix)

    def request_put(self, path: str, hash: str) -> RequestResponse:
        return self.managed.put_for_environment_request(self.env_uuid, path, hash)

    def prove(self, request: RequestResponse | PutResponse | str, checksum: str = "") -> Resource:
        """Answer a request: `prove(request_id, checksum)` or `prove(PutResponse)`."""
        if isinstance(request, PutResponse):
            response = request
        else:
            request_id = request.request_id if isinstance(request, RequestResponse) else request
            response = new_put_response(request_id, checksum)
        return self.managed.proof_of_access_response(response, env_uuid=self.env_uuid)

    def kv(self) -> KVStore:
        """This environment as a key-value store (catalog.kv); close() it when done."""
        from catalog.kv import KVStore

        return KVStore(self.managed, self.env_uuid)

    def __repr__(self) -> str:
        return f"Environment({self.env_uuid!r})"
