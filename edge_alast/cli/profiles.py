"""``edge-alast profiles``: list, show and validate device profiles (shipped names, ``auto``, or YAML files)."""
from __future__ import annotations

import json
from pathlib import Path

import click
import yaml

from edge_alast.device.profiles import AUTO, DeviceProfile, ProfileError, list_profiles, load_profile
from edge_alast.errors import EXIT_USAGE


class ProfileCliError(click.ClickException):
    """A profile that cannot be loaded; exits with status 2 like click's usage errors."""

    exit_code = EXIT_USAGE


def _load(name_or_path: str | Path) -> DeviceProfile:
    try:
        return load_profile(name_or_path)
    except ProfileError as e:
        raise ProfileCliError(str(e)) from None


@click.group()
def profiles() -> None:
    """Device profiles: the memory and compute limits a run is planned against.

    \b
    Example:
      edge-alast profiles show jetson_orin_nano_4gb > my_board.yaml   # edit, then:
      edge-alast profiles validate my_board.yaml && edge-alast train --profile my_board.yaml ...
    """


@profiles.command("list")
def list_command() -> None:
    """List the shipped profiles (and "auto") with a one-line description.

    \b
    Example:
      edge-alast profiles list
    """
    rows = []
    for name in list_profiles():
        profile = _load(name)
        summary = profile.description.splitlines()[0]
        if profile.alias_of:
            summary = f"alias of {profile.alias_of}: {summary}"
        rows.append((name, summary))
    rows.append((AUTO, "detect this host at run time (memory, CPU flags, CUDA device)"))
    width = max(len(name) for name, _ in rows)
    for name, summary in rows:
        click.echo(f"{name:<{width}}  {summary}")


@profiles.command("show")
@click.argument("name_or_path")
@click.option("--json", "as_json", is_flag=True, help="Print JSON (all fields, including source) instead of YAML.")
def show_command(name_or_path: str, as_json: bool) -> None:
    """Print the resolved profile NAME_OR_PATH (a shipped name, "auto", or a .yaml file).

    The YAML output is itself a valid profile file: copy it, edit it, and pass the path to --profile.

    \b
    Example:
      edge-alast profiles show auto --json
    """
    profile = _load(name_or_path)
    data = profile.to_dict()
    if as_json:
        click.echo(json.dumps(data, indent=2))
        return
    source, alias_of = data.pop("source"), data.pop("alias_of")
    click.echo(f"# source: {source}")
    if alias_of:
        click.echo(f"# {profile.name} is an alias of {alias_of}")
    click.echo(yaml.safe_dump(data, sort_keys=False, width=120), nl=False)


@profiles.command("validate")
@click.argument("file", type=click.Path(dir_okay=False))
def validate_command(file: str) -> None:
    """Check that FILE is a valid profile: prints "ok", or the error and exits with status 2.

    \b
    Example:
      edge-alast profiles validate my_board.yaml
    """
    _load(Path(file))  # a Path is always read as a file, whatever its name
    click.echo("ok")
