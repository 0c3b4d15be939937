"""`rescat kv`: the KV store (catalog.kv) from the shell.

A key is a path of the environment, so `rescat get ENV KEY` reads a value too.
Values print raw; listings and watches print JSON with the value as text when
it is UTF-8 (`value`) and always as base64 (`value_base64`).
"""

from __future__ import annotations

import base64
import codecs
import contextlib
import json
import os
import sys
import textwrap
from collections.abc import Iterator
from typing import Any, BinaryIO, TextIO

import blake3
import click

from catalog.errors import CatalogError, HashMismatchError, NotFoundError
from catalog.kv import (
    MAX_VALUE,
    KeyInfo,
    KVPair,
    KVStore,
    check_ttl,
    clean_key,
    clean_prefix,
)
from catalog.names import check_env
from catalog.streams import read_exact
from cli.app import Context, Group, cli, pass_ctx, with_hint


def _pair_json(pair: KVPair) -> dict[str, Any]:
    data: dict[str, Any] = {
        "key": pair.key,
        "revision": pair.last_index,
        "length": len(pair.value),
        "value_base64": base64.b64encode(pair.value).decode("ascii"),
    }
    with contextlib.suppress(UnicodeDecodeError):
        data["value"] = pair.value.decode("utf-8")
    return data


# A value up to this size is read whole for --json; a larger one is written as it is read.
_WHOLE = 1024 * 1024
_BLOCK = 3 * 256 * 1024  # a multiple of 3: its base64 needs no padding before the end


def _open_pair(store: KVStore, key: str) -> tuple[KeyInfo, BinaryIO]:
    """A key's info and a stream of its value, consistent (the value at that revision)."""
    for _ in range(5):
        info = store.key_info(key)
        with contextlib.suppress(NotFoundError):  # changed meanwhile: read the key again
            return info, store.open_value(info)
    raise CatalogError(f"{store.env_uuid}: key {key!r} keeps changing")


def _write_pair_json(out: TextIO, store: KVStore, info: KeyInfo, margin: str) -> None:
    """One pair as `_pair_json` prints it (indent 2, sorted keys), streamed when large.

    A large value is read in passes (is it UTF-8? its text; its base64), a
    block at a time: memory stays bounded whatever the value's size, and the
    output is written in pieces (one write of more than 2 GiB is cut short).
    """
    if info.length <= _WHOLE:
        with _value_stream(store, info) as reader:
            pair = KVPair(info.key, reader.read(), info.last_index)
        text = json.dumps(_pair_json(pair), indent=2, sort_keys=True)
        out.write(textwrap.indent(text, margin).lstrip(" "))
        return
    inner = margin + "  "
    out.write("{\n")
    out.write(f'{inner}"key": {json.dumps(info.key)},\n')
    out.write(f'{inner}"length": {info.length},\n')
    out.write(f'{inner}"revision": {info.last_index},\n')
    if _is_utf8(store, info):
        out.write(f'{inner}"value": "')
        decoder = codecs.getincrementaldecoder("utf-8")()
        for block in _blocks(store, info):
            out.write(json.dumps(decoder.decode(block))[1:-1])
        out.write('",\n')
    out.write(f'{inner}"value_base64": "')
    for block in _blocks(store, info):
        out.write(base64.b64encode(block).decode("ascii"))
    out.write(f'"\n{margin}}}')


@contextlib.contextmanager
def _value_stream(store: KVStore, info: KeyInfo) -> Iterator[BinaryIO]:
    reader = store.open_value(info)
    try:
        yield reader
    finally:
        reader.close()


def _blocks(store: KVStore, info: KeyInfo) -> Iterator[bytes]:
    """The value in blocks of _BLOCK bytes (the last shorter), checked against its length."""
    total = 0
    with _value_stream(store, info) as reader:
        while True:
            block = read_exact(reader, _BLOCK)
            if not block:
                break
            total += len(block)
            yield block
    if total != info.length:
        raise CatalogError(f"{info.key}: read {total} bytes, expected {info.length}")


def _is_utf8(store: KVStore, info: KeyInfo) -> bool:
    """Whether the whole value is UTF-8 (binary content fails in its first block)."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    try:
        for block in _blocks(store, info):
            decoder.decode(block)
        decoder.decode(b"", final=True)
    except UnicodeDecodeError:
        return False
    return True


def _line(data: Any) -> None:
    click.echo(json.dumps(data, sort_keys=True))
    sys.stdout.flush()


@cli.group(cls=Group)  # its commands take the profile's env as every data command does
def kv() -> None:
    """Key-value store over an environment's paths (revisions, CAS, watch, TTL).

    \b
    Example:
      rescat kv put team-a config/db postgres://db
      rescat kv get team-a config/db
      rescat kv watch team-a --prefix config
    """


@kv.command("put")
@click.argument("env")
@click.argument("key")
@click.argument("value")
@click.option("--ttl", type=float, default=None, help="Seconds the key lives after this put.")
@click.option(
    "--if-revision",
    type=click.IntRange(min=1),
    default=None,
    help="Only if the key is at this revision (compare-and-swap).",
)
@click.option("--create", is_flag=True, help="Only if the key does not exist.")
@pass_ctx
def kv_put(
    ctx: Context,
    env: str,
    key: str,
    value: str,
    ttl: float | None,
    if_revision: int | None,
    create: bool,
) -> None:
    """Set KEY to VALUE (text), to stdin with -, or to a file's bytes with @FILE.

    Prints the key's new revision. With --ttl the key is gone from every read
    TTL seconds later (nothing renews it once this command has exited).
    --if-revision N writes only if the key is still at revision N (as printed
    by a put, or `kv get --json`), --create only if it does not exist: checked
    with the write; otherwise the command fails, exit 1, and nothing changes.

    \b
    Example:
      rescat kv put team-a config/db postgres://db
      rescat kv put team-a certs/ca @ca.pem
      echo -n on | rescat kv put team-a flags/x - --ttl 30
      rescat kv put team-a leader node-1 --create
      rescat kv put team-a config/db postgres://db2 --if-revision 7713966
    """
    check_env(env)
    k = clean_key(key)
    check_ttl(ttl)
    if create and if_revision is not None:
        raise click.UsageError("--create and --if-revision exclude each other")
    if value == "-":
        data = _value_from(sys.stdin.buffer, "stdin")
    elif value.startswith("@"):
        name = value[1:]
        if not name:
            raise click.UsageError("@FILE needs a file name (@- is not stdin: use -)")
        try:
            with open(name, "rb") as source:
                data = _value_from(source, name)
        except OSError as exc:
            raise click.ClickException(f"cannot read {name}: {exc.strerror}") from None
    else:
        data = os.fsencode(value)  # the argument's bytes as given, UTF-8 or not
    store = _store(ctx, env)
    try:
        if create:
            pair = store.atomic_put(k, data, None, ttl=ttl)
        elif if_revision is not None:
            pair = store.atomic_put(k, data, KVPair(k, b"", if_revision), ttl=ttl)
        else:
            pair = store.put(k, data, ttl=ttl)
    finally:
        store.close()
    click.echo(pair.last_index)


def _store(ctx: Context, env: str) -> KVStore:
    """The environment's KV store, on the database: never a local one by mistake.

    `kv get/put/ls/rm` work on a database. Where the data commands go to a
    service (--server, RESCAT_SERVER, a profile's server), using rescat's own
    local mongod instead would read and write another catalog: refused.
    """
    server = _configured_server(ctx)
    if server is not None:
        raise click.ClickException(
            f"`rescat kv` works on a database, and only a service is configured ({server}): "
            "give --mongo-uri (or mongo_uri in the profile); through the service, a key is "
            "a path: `rescat get ENV KEY`, `rescat put ENV KEY FILE`, `rescat kv watch`"
        )
    return KVStore(ctx.managed, env)


def _configured_server(ctx: Context) -> str | None:
    """The service the data commands go to when no database is configured at all."""
    if not ctx.uses_embedded:
        return None
    return ctx.profile.get("server") or os.environ.get("RESCAT_SERVER") or None


def _value_from(source: BinaryIO, name: str) -> bytes:
    """At most one byte more than a value may hold: a wrong file or an endless pipe
    (`yes | rescat kv put ...`) is refused after 1 MiB, not read into memory whole."""
    data = source.read(MAX_VALUE + 1)
    if len(data) > MAX_VALUE:
        raise click.ClickException(
            f"{name}: a value is at most {MAX_VALUE} bytes (1 MiB), and this one is longer; "
            "store larger content with rescat put"
        )
    return data


@kv.command("get")
@click.argument("env")
@click.argument("key")
@click.option(
    "--json", "as_json", is_flag=True, help='Print {"key","revision","value",...} instead.'
)
@pass_ctx
def kv_get(ctx: Context, env: str, key: str, as_json: bool) -> None:
    """Write KEY's value, raw, to stdout.

    With --json, the key, its revision (for `kv put --if-revision`) and its
    value, as `kv ls --json` prints each key.

    \b
    Example:
      rescat kv get team-a config/db
      rescat kv get team-a config/db --json
    """
    check_env(env)
    clean_key(key)
    store = _store(ctx, env)
    try:
        if as_json:
            _write_pair_json(sys.stdout, store, store.key_info(key), "")
            sys.stdout.write("\n")
            sys.stdout.flush()
            return
        info, reader = _open_pair(store, key)
        try:
            _stream_value(info, reader, sys.stdout.buffer)
        finally:
            reader.close()
    finally:
        store.close()


def _stream_value(info: KeyInfo, reader: BinaryIO, sink: BinaryIO) -> None:
    """Copy the value to `sink` a block at a time, checked as `get` checks (length, BLAKE3)."""
    hasher = blake3.blake3()
    total = 0
    while piece := reader.read(1024 * 1024):
        sink.write(piece)
        hasher.update(piece)
        total += len(piece)
    sink.flush()
    if total != info.length or hasher.hexdigest() != info.hash:
        raise HashMismatchError(
            f"{info.key}: stored bytes ({total}) hash to {hasher.hexdigest()}, "
            f"not {info.hash} ({info.length})"
        )


@kv.command("ls")
@click.argument("env")
@click.argument("prefix", default="")
@click.option("--json", "as_json", is_flag=True, help='Print [{"key","revision","value",...}].')
@pass_ctx
def kv_ls(ctx: Context, env: str, prefix: str, as_json: bool) -> None:
    """List the keys at or under PREFIX (whole segments: `a` lists a and a/..., not ab).

    \b
    Example:
      rescat kv ls team-a config
      rescat kv ls team-a --json
    """
    check_env(env)
    clean_prefix(prefix)
    store = _store(ctx, env)
    try:
        if as_json:
            _write_list_json(sys.stdout, store, prefix)
            return
        for info in store.keys(prefix):  # names only: no value is read
            click.echo(info.key)
    finally:
        store.close()


def _write_list_json(out: TextIO, store: KVStore, prefix: str) -> None:
    """The JSON array of every pair under prefix, written pair by pair (as echo_json lays it out).

    Values are read one at a time, each as it is written: memory is bounded
    by a block, not by the listing, and no single write grows with it.
    """
    first = True
    for info in store.keys(prefix):
        out.write("[\n  " if first else ",\n  ")
        first = False
        try:
            _write_pair_json(out, store, info, "  ")
        except NotFoundError:
            raise CatalogError(
                f"{store.env_uuid}: key {info.key!r} changed while it was listed; run again"
            ) from None
    out.write("[]\n" if first else "\n]\n")
    out.flush()


@kv.command("rm")
@click.argument("env")
@click.argument("key")
@click.option("-r", "--recursive", is_flag=True, help="Delete KEY and every key under KEY/.")
@click.option(
    "--if-revision",
    type=click.IntRange(min=1),
    default=None,
    help="Only if the key is at this revision.",
)
@pass_ctx
def kv_rm(ctx: Context, env: str, key: str, recursive: bool, if_revision: int | None) -> None:
    """Delete KEY (with -r, KEY and every key under it).

    --if-revision N deletes only if the key is still at revision N (checked
    with the delete; otherwise exit 1 and nothing changes).

    \b
    Example:
      rescat kv rm team-a config/db
      rescat kv rm -r team-a config
      rescat kv rm team-a leader --if-revision 7713966
    """
    check_env(env)
    k = clean_key(key)
    if recursive and if_revision is not None:
        raise click.UsageError("-r and --if-revision exclude each other")
    store = _store(ctx, env)
    try:
        if recursive:
            store.delete_range(k)
        elif if_revision is not None:
            store.atomic_delete(k, KVPair(k, b"", if_revision))
        else:
            store.delete(k)
    finally:
        store.close()


@kv.command("watch")
@click.argument("env")
@click.argument("key", required=False)
@click.option("--prefix", default=None, help="Watch every key at or under this prefix.")
@click.option(
    "--server",
    envvar="RESCAT_SERVER",
    default=None,
    help="Watch over HTTP through this service (env RESCAT_SERVER) instead of MongoDB.",
)
@click.option(
    "--token",
    envvar="RESCAT_TOKEN",
    default=None,
    help="Bearer token for the service (env RESCAT_TOKEN, or the profile's token).",
)
@click.option(
    "--since",
    type=click.IntRange(min=0),
    default=None,
    help="With --server: first the changes after this revision.",
)
@pass_ctx
def kv_watch(
    ctx: Context,
    env: str,
    key: str | None,
    prefix: str | None,
    server: str | None,
    token: str | None,
    since: int | None,
) -> None:
    """Print one JSON line per change of KEY (or under --prefix) until Ctrl-C.

    The first line is the current state. For a key: {"type":"put",...} or
    {"type":"delete","key"}; for a prefix: {"type":"list","prefix","items":[...]}
    with the whole list after each change.

    With --server the watch runs over HTTP (the service's /watch stream) and
    prints one line per change, for a key and for a prefix alike (a plain
    string prefix there): {"type":"put","key","revision","hash","length",
    "value","value_base64"} (the value when it is still the current one) or
    {"type":"delete","key","revision"}; no line for the state before. It
    reconnects by itself and resumes from the last revision printed.

    \b
    Example:
      rescat kv watch team-a config/db
      rescat kv watch team-a --prefix config
      rescat kv watch --server http://catalog:8470 team-a --prefix config/
    """
    check_env(env)
    if (key is None) == (prefix is None):
        raise click.UsageError("give either KEY or --prefix P")
    if server is None and _configured_server(ctx):  # a profile's, as the data commands
        server, token = _configured_server(ctx), token or ctx.profile.get("token")
    if server is not None:
        try:
            _watch_http(server, token, env, key, prefix, since)
        except CatalogError as exc:
            raise with_hint(exc, server) from None
        return
    if since is not None:
        raise click.UsageError("--since needs --server")
    store = _store(ctx, env)
    try:
        if key is not None:
            name = clean_key(key)
            for item in store.watch(name):
                if item is None:
                    _line({"type": "delete", "key": name})
                else:
                    _line({"type": "put", **_pair_json(item)})
        else:
            assert prefix is not None
            start = clean_prefix(prefix)
            for items in store.watch_range(start):
                _line({"type": "list", "prefix": start, "items": [_pair_json(p) for p in items]})
    except KeyboardInterrupt:
        pass  # Ctrl-C ends a watch normally
    finally:
        store.close()


def _watch_http(
    server: str, token: str | None, env: str, key: str | None, prefix: str | None, since: int | None
) -> None:
    """`kv watch --server`: CatalogClient.watch, one JSON line per event."""
    import blake3

    from catalog.errors import NotFoundError
    from service.client import CatalogClient

    name = clean_key(key) if key is not None else None
    with CatalogClient(server, token) as client:
        try:
            for event in client.watch(env, key=name, prefix=prefix, since=since):
                if event["type"] == "delete":
                    _line({"type": "delete", "key": event["path"], "revision": event["revision"]})
                    continue
                line: dict[str, Any] = {
                    "type": "put",
                    "key": event["path"],
                    "revision": event["revision"],
                    "hash": event["hash"],
                    "length": event["length"],
                }
                with contextlib.suppress(NotFoundError):
                    data = client.read(env, event["path"])
                    if blake3.blake3(data).hexdigest() == event["hash"]:
                        line["value_base64"] = base64.b64encode(data).decode("ascii")
                        with contextlib.suppress(UnicodeDecodeError):
                            line["value"] = data.decode("utf-8")
                _line(line)
        except KeyboardInterrupt:
            pass  # Ctrl-C ends a watch normally
