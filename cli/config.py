"""The config file: named profiles of server, token, default environment and MongoDB URI.

`~/.config/rescat/config.toml` (platformdirs' user config dir; `RESCAT_CONFIG`
names another file). Each top-level table is a profile; `default` is used
unless `--profile NAME` or `RESCAT_PROFILE` picks another:

    [default]
    mongo_uri = "mongodb://db:27017/?replicaSet=rs0"
    env = "team-a"

    [prod]
    server = "https://catalog.example.com"
    token = "..."
    env = "team-a"

What the command line or an environment variable says wins over the profile,
the profile over the built-in default, as with the aws and mc CLIs.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

import click

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - 3.10
    import tomli as tomllib

KEYS = ("server", "token", "env", "mongo_uri", "database")
DEFAULT_PROFILE = "default"


def config_path() -> Path:
    override = os.environ.get("RESCAT_CONFIG")
    if override:
        return Path(override)
    import platformdirs

    return Path(platformdirs.user_config_dir("rescat")) / "config.toml"


def load_profile(name: str | None) -> dict[str, str]:
    """The settings of profile `name` (None: `default`, which may be absent).

    A named profile that does not exist, a file that is not TOML, or a key
    rescat does not know is an error that names the file: a typo in a config
    file should not silently send data to the wrong place.
    """
    path = config_path()
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        if name is not None:
            raise click.ClickException(
                f"no profile {name!r}: {path} does not exist (create it with a [{name}] table)"
            ) from None
        return {}
    except OSError as exc:
        raise click.ClickException(f"cannot read {path}: {exc.strerror or exc}") from None
    try:
        data: dict[str, Any] = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise click.ClickException(f"{path}: not valid TOML ({exc})") from None
    wanted = name or DEFAULT_PROFILE
    profile = data.get(wanted)
    if profile is None:
        if name is None:
            return {}
        known = ", ".join(sorted(k for k, v in data.items() if isinstance(v, dict))) or "none"
        raise click.ClickException(f"no profile {name!r} in {path} (profiles: {known})")
    if not isinstance(profile, dict):
        raise click.ClickException(f"{path}: [{wanted}] must be a table of settings")
    unknown = sorted(set(profile) - set(KEYS))
    if unknown:
        raise click.ClickException(
            f"{path}: [{wanted}] has unknown key(s) {', '.join(unknown)} (known: {', '.join(KEYS)})"
        )
    bad = [k for k, v in profile.items() if not isinstance(v, str)]
    if bad:
        raise click.ClickException(f"{path}: [{wanted}] {', '.join(bad)} must be strings")
    return {str(k): str(v) for k, v in profile.items()}
