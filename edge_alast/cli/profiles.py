"""``edge-alast profiles``: list, show and validate device profiles (shipped names, ``auto``, or YAML files), and
calibrate one by measuring this host."""
from __future__ import annotations

import json
from pathlib import Path

import click
import yaml

from edge_alast.errors import ConfigError
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


@profiles.command("calibrate")
@click.option("--out", "out", required=True, type=click.Path(dir_okay=False),
              help="The profile file to write (.yaml); it is validated after writing.")
@click.option("--name", default=None, help="The profile's name. Default: the --out file's stem.")
@click.option("--seconds", default=20.0, show_default=True, type=click.FloatRange(min=0, min_open=True),
              help="Time spent timing kernels, split between precisions; a fresh process's start comes on top.")
@click.option("--device", type=click.Choice(["cpu", "cuda"]), default=None,
              help="Device to measure. Default: CUDA when torch sees a device, else the CPU.")
def calibrate_command(out: str, name: str | None, seconds: float, device: str | None) -> None:
    """Measure this host and write a profile whose figures say they were measured here.

    Times the matmuls and attention of a ViT-S block per precision (fp32; bf16 where supported; fp16 on CUDA)
    and reads the memory a training process may use (cgroup limit, available RAM, GPU memory). Figures that
    are not measured (step target, batch size) are marked [default].

    \b
    Example:
      edge-alast profiles calibrate --out my_board.yaml --seconds 30
      edge-alast train --profile my_board.yaml ...
    """
    from edge_alast.device.calibrate import CalibrationError, check_writable, measure_host, render_profile, \
        summarise, write_profile

    problem = check_writable(out)
    if problem is not None:
        raise ProfileCliError(f"--out: {problem}")
    try:
        measurement = measure_host(device=device, seconds=seconds)
    except ConfigError as e:
        raise ProfileCliError(f"--device: {e}") from None
    except CalibrationError as e:
        raise click.ClickException(str(e)) from None
    try:
        write_profile(out, render_profile(measurement, name or Path(out).stem))
    except OSError as e:
        raise ProfileCliError(f"--out: cannot write {out}: {e}") from None
    except CalibrationError as e:
        raise click.ClickException(str(e)) from None
    for line in summarise(measurement):
        click.echo(line)
    click.echo(f"wrote {out}")
