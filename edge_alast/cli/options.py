"""Options and run files: every ``train`` option comes from the config dataclasses, and a YAML run file fills the
same fields. Written once, for ``train`` and ``fleet local`` alike."""
from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import click

from ..errors import ConfigError


# A run file is a page of settings; anything larger is a mistake or an attack, and is refused before parsing.
RUN_FILE_MAX_BYTES = 1 << 20


def load_run_file(path: str | None) -> dict:
    """The run file at ``path`` as a mapping of option names (``-`` read as ``_``) to values; ``{}`` without one.

    Refused with a :class:`ConfigError` naming the file: over :data:`RUN_FILE_MAX_BYTES`, not YAML, not a mapping,
    or holding YAML anchors or aliases (``&a`` / ``*a``). Aliases let a file of a few hundred bytes expand to
    gigabytes (each level of a "billion laughs" file repeats the one before); a run file never needs them, so they
    are refused from the parser's events, before anything is built.
    """
    if path is None:
        return {}
    import yaml

    try:
        with open(path, "rb") as f:
            raw = f.read(RUN_FILE_MAX_BYTES + 1)
    except OSError as e:
        raise ConfigError(f"--config: cannot read {path}: {e}") from e
    if len(raw) > RUN_FILE_MAX_BYTES:
        raise ConfigError(f"--config: {path} is larger than {RUN_FILE_MAX_BYTES // 1024} KiB; a run file holds "
                          "settings only")
    try:
        text = raw.decode("utf-8")
        for event in yaml.parse(text, Loader=yaml.SafeLoader):
            if isinstance(event, yaml.AliasEvent) or getattr(event, "anchor", None) is not None:
                mark = event.start_mark
                raise ConfigError(f"--config: {path}, line {mark.line + 1}: YAML anchors and aliases (&name, *name) "
                                  "are not accepted in run files; write each value out")
        data = yaml.safe_load(text)
    except (UnicodeDecodeError, yaml.YAMLError) as e:
        raise ConfigError(f"--config: cannot read {path}: {e}") from e
    if not isinstance(data, dict):
        raise ConfigError(f"--config: {path} must hold a mapping of option names to values")
    return {str(k).replace("-", "_"): v for k, v in data.items()}


class FiniteFloat(click.FloatRange):
    """A float option that must be finite: click's FloatRange lets ``nan`` through any range (every comparison with
    it is false) and ``inf`` through an open-ended one. For the commands' own options; ``train``'s come from the
    config's field metadata, which checks the same."""

    name = "finite float"

    def convert(self, value, param, ctx):
        number = super().convert(value, param, ctx)
        if not math.isfinite(number):
            self.fail(f"{value!r} is not a finite number", param, ctx)
        return number


def _parse_list(kind: str, flag: str):
    """A click callback turning a comma-separated value into a list (``int_list`` or ``str_list``)."""
    def parse(ctx, param, value):
        if value is None:
            return None
        parts = [part.strip() for part in value.split(",") if part.strip()]
        if kind == "str_list":
            return parts
        try:
            return [int(part) for part in parts]
        except ValueError:
            raise click.BadParameter(f"expected comma-separated block indices, got {value!r}",
                                     param_hint=flag) from None
    return parse


_CLICK_TYPES = {"int": int, "float": float, "str": str}


def _param_name(flag: str) -> str:
    """The click parameter of a section flag: ``--alast-freeze/--no-alast-freeze`` -> ``alast_freeze``."""
    return flag.split("/")[0].lstrip("-").replace("-", "_")


def config_options(command):
    """Add an option for every config field that has a ``flag`` (:mod:`edge_alast.config`), with the field's
    default, choices and help: the dataclasses are the one source of them. Section fields (``--lora-r``) are
    passed as ``lora_r``; :func:`nested_options` maps them back."""
    from ..config import SECTIONS, TrainConfig

    fields = [(None, f) for f in dataclasses.fields(TrainConfig)]
    fields += [(key, f) for key, cls in SECTIONS.items() for f in dataclasses.fields(cls)]
    for section, f in reversed([(s, f) for s, f in fields if f.metadata.get("flag")]):
        meta, kind = f.metadata, str(f.type).replace(" ", "").removesuffix("|None")
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        help_text = meta["help"]
        if isinstance(default, bool):
            help_text += f"  [default: {'on' if default else 'off'}]"
        elif default not in (None, dataclasses.MISSING, []):
            shown = ",".join(map(str, default)) if isinstance(default, list) else default
            help_text += f"  [default: {shown}]"
        name = f.name if section is None else _param_name(meta["flag"])
        kwargs = {"help": help_text}
        if meta.get("envvar"):
            kwargs["envvar"] = meta["envvar"]
            kwargs["show_envvar"] = True
        if "/" in meta["flag"] or kind == "bool":
            kwargs["default"] = None
            decl = meta["flag"] if "/" in meta["flag"] else f"{meta['flag']}/--no-{meta['flag'][2:]}"
        else:
            decl = meta["flag"]
            if meta.get("choices"):
                kwargs["type"] = click.Choice(list(meta["choices"]))
            elif meta.get("parse"):
                kwargs["type"] = str
                kwargs["callback"] = _parse_list(meta["parse"], meta["flag"])
            else:
                kwargs["type"] = _CLICK_TYPES[kind]
        command = click.option(decl, name, **kwargs)(command)
    return command


def nested_options(options: dict) -> dict[str, dict]:
    """Pop the section options (``lora_r`` ...) out of ``options`` as ``{section: {key: value}}``."""
    from ..config import SECTIONS

    nested = {}
    for key, cls in SECTIONS.items():
        for f in dataclasses.fields(cls):
            flag = f.metadata.get("flag")
            if flag and (value := options.pop(_param_name(flag))) is not None:
                nested.setdefault(key, {})[f.name] = value
    return nested


def merge_options(config_file: str | None, options: dict) -> dict:
    """The run file's values, overridden by the options given on the command line (``None`` = not given); section
    options (``--lora-r``) land in their section (``{"lora": {"r": ...}}``)."""
    values = load_run_file(config_file)
    for section, given in nested_options(options).items():
        current = values.get(section)
        if current is None:
            current = {}
        if not isinstance(current, dict):
            raise ConfigError(f"{config_file}: {section} must be a mapping")
        values[section] = {**current, **given}
    values.update({k: v for k, v in options.items() if v is not None})
    return values
