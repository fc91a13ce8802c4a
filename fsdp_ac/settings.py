"""fsdp_ac's settings, parsed from strings once, at the edge (``docs/environment.md``).

``FSDP_AC_*`` variables, the ``fsdp_ac_*`` keys of an Accelerate config file, budgets. Each parser
takes a value from the environment (a string) or from a config file (a string, bool, number or
list) and the place it came from, which every error names.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from pathlib import Path

from fsdp_ac.strategies import STRATEGIES, NoCheckpoint, Strategy, parse_strategy

__all__ = [
    "SETTING_PARSERS",
    "environment_settings",
    "launch_config_file",
    "launcher",
    "own_settings",
    "parse_bool",
    "parse_budget",
]

_FILE_KEY_PREFIX = "fsdp_ac_"
_FILE_SECTION = "fsdp_config"
_UNITS = {"B": 1, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "KB": 10**3, "MB": 10**6, "GB": 10**9}


def environment_settings() -> dict[str, object]:
    """Returns fsdp_ac's settings given as ``FSDP_AC_<NAME>`` variables, parsed, by name.

    Raises:
        ValueError: A variable has an invalid value; the message names it and the values it takes.

    Example:
        >>> os.environ["FSDP_AC_POLICY"] = "every:2"
        >>> environment_settings()
        {'policy': 'every:2'}
    """
    return {name: found[0] for name, found in _environment_settings().items()}


def _environment_settings() -> dict[str, tuple[object, str]]:
    found: dict[str, tuple[object, str]] = {}
    for name, parse in SETTING_PARSERS.items():
        variable = f"FSDP_AC_{name.upper()}"
        raw = os.environ.get(variable, "").strip()
        if raw:
            found[name] = (parse(raw, variable), variable)
    return found


def own_settings(default_policy: str | None = None) -> dict[str, tuple[object, str]]:
    """fsdp_ac's own settings: ``{name: (value, where it came from)}``, the environment over the file.

    The file is the one ``FSDP_AC_CONFIG_FILE`` names, else the one ``accelerate launch`` was given.
    ``default_policy`` applies when neither gives a policy or a plan.

    Raises:
        ValueError: A setting has an invalid value, or the file an unknown ``fsdp_ac_*`` key.
    """
    found: dict[str, tuple[object, str]] = {}
    raw = os.environ.get("FSDP_AC_CONFIG_FILE", "").strip()
    path = _parse_existing_file(raw, "FSDP_AC_CONFIG_FILE") if raw else launch_config_file()
    if path is not None:
        found.update(_read_config_file(path))
    found.update(_environment_settings())
    if default_policy and not {"policy", "plan"} & found.keys():
        found["policy"] = (default_policy, "the default of fsdp_ac.run")
    return found


def launcher() -> str:
    """The launcher errors name: ``accelerate launch`` (it sets ACCELERATE_DYNAMO_BACKEND) or torchrun."""
    return "accelerate launch" if "ACCELERATE_DYNAMO_BACKEND" in os.environ else "torchrun"


def launch_config_file() -> Path | None:
    """The config file of the ``accelerate launch`` that started this process, or None.

    Accelerate 1.15 and 1.16 export no variable that names it, so it is read from the launcher's
    command line (``--config_file``, else Accelerate's default file), found among this process's
    ancestors through ``/proc`` (Linux; elsewhere None: set ``FSDP_AC_CONFIG_FILE``).
    """
    if launcher() != "accelerate launch":
        return None
    pid = os.getppid()
    for _ in range(4):  # the launcher is the parent, or a few levels up under a wrapper script
        proc = Path(f"/proc/{pid}")
        try:
            argv = (proc / "cmdline").read_bytes().decode(errors="replace").split("\0")
            stat = (proc / "stat").read_text()
        except OSError:
            return None
        if any(arg.endswith("accelerate") or "accelerate.commands" in arg for arg in argv[:3]):
            for index, arg in enumerate(argv):
                if arg.endswith(".py") or arg == "fsdp_ac.run":
                    break  # the training script's own arguments follow
                if arg.startswith("--config_file="):
                    return (proc / "cwd").resolve() / arg.split("=", 1)[1]
                if arg == "--config_file" and index + 1 < len(argv):
                    return (proc / "cwd").resolve() / argv[index + 1]
            from accelerate.commands.config import default_config_file

            return Path(default_config_file) if Path(default_config_file).is_file() else None
        pid = int(stat.rsplit(")", 1)[1].split()[1])
    return None


def _read_config_file(path: Path) -> dict[str, tuple[object, str]]:
    """The ``fsdp_ac_*`` keys of the ``fsdp_config`` section of an Accelerate config file, parsed."""
    text = path.read_text(encoding="utf-8")
    if path.suffix.lower() == ".json":
        import json

        document = json.loads(text)
    else:
        import yaml  # a dependency of accelerate

        document = yaml.safe_load(text)
    section = document.get(_FILE_SECTION) if isinstance(document, dict) else None
    stray = sorted(k for k in (document or {}) if isinstance(k, str) and k.startswith(_FILE_KEY_PREFIX))
    if stray:
        raise ValueError(
            f"{path} has {', '.join(stray)} at the top level, where accelerate launch rejects unknown "
            f"keys; move them into the {_FILE_SECTION} section."
        )
    found: dict[str, tuple[object, str]] = {}
    for key, raw in (section or {}).items():
        if not (isinstance(key, str) and key.startswith(_FILE_KEY_PREFIX)):
            continue
        name = key[len(_FILE_KEY_PREFIX) :]
        parse = SETTING_PARSERS.get(name)
        if parse is None:
            known = ", ".join(_FILE_KEY_PREFIX + n for n in SETTING_PARSERS)
            raise ValueError(f"{path}: unknown key {_FILE_SECTION}.{key}; the fsdp_ac keys are {known}.")
        source = f"{_FILE_SECTION}.{key} in {path}"
        if name == "plan":
            raw = path.parent / Path(str(raw)).expanduser()  # relative to the config file
        found[name] = (parse(raw, source), source)
    return found


_TRUE = ("1", "true", "yes", "on")
_FALSE = ("0", "false", "no", "off")
_POLICY_KINDS = ("every", "first", "last", "budget")


def parse_bool(raw: object, source: str) -> bool:
    """Parses ``true``/``false`` (also ``1``/``0``, ``yes``/``no``, ``on``/``off``, a YAML bool)."""
    if isinstance(raw, bool):
        return raw
    text = str(raw).strip().lower()
    if text in _TRUE:
        return True
    if text in _FALSE:
        return False
    raise ValueError(f"{source} must be true or false, got {raw!r}.")


def _parse_byte_count(raw: object, source: str) -> int:
    """Parses a non-negative integer number of bytes."""
    text = str(raw).strip()
    if isinstance(raw, bool) or not text.isdigit():
        raise ValueError(f"{source} must be a non-negative integer number of bytes, got {raw!r}.")
    return int(text)


def _parse_class_names(raw: object, source: str) -> tuple[str, ...]:
    """Parses block class names: a comma-separated string or a list of strings."""
    items = raw if isinstance(raw, (list, tuple)) else str(raw).split(",")
    names = tuple(str(item).strip() for item in items if str(item).strip())
    if not names:
        raise ValueError(f"{source} must name at least one block class, e.g. LlamaDecoderLayer; got {raw!r}.")
    return names


def parse_budget(raw: object, source: str = "the budget", *, fraction_only: bool = False) -> int | float:
    """Parses a memory budget: a fraction of no AC's activation bytes or bytes (with a unit).

    ``0.5`` and ``50%`` are fractions, ``300MiB``, ``2GiB`` and ``123B`` bytes; a bare number is a
    fraction, so at most 1. ``fraction_only`` refuses bytes.

    Raises:
        ValueError: Neither, a bare number above 1 (the message asks: percent or bytes?), a fraction
            above 100%, or a budget that is not positive.
    """
    text = str(raw).strip().replace(" ", "")
    match = re.fullmatch(r"([0-9]*\.?[0-9]+)(%|[A-Za-z]*)", text)
    unit = match.group(2).upper() if match else ""
    units = () if fraction_only else _UNITS
    if match is None or unit not in ("", "%", *units):
        kinds = "" if fraction_only else " or bytes with a unit (300MiB, 2GiB, 123B)"
        raise ValueError(f"Cannot read {source} {text!r}: give a fraction of no AC's bytes (0.5, 50%){kinds}")
    number = float(match.group(1))
    budget: int | float = int(number * _UNITS[unit]) if unit in units else number / (100 if unit else 1)
    if not unit and budget > 1:
        raise ValueError(
            f"{source} {text!r} is ambiguous: a bare number is a fraction of no AC's activation bytes, "
            f"at most 1. Did you mean {text}%{'' if fraction_only else f' or {text}B'}?"
        )
    if unit == "%" and budget > 1:
        raise ValueError(f"{source} {text!r} is above 100% of no AC's activation bytes; give 100% or less.")
    if budget <= 0:
        raise ValueError(f"{source} {text!r} must be positive.")
    return budget


def _parse_ac_policy(raw: object, source: str) -> str:
    """Parses which blocks: all, none, every:N, first:K, last:K or budget:F; returns it normalised."""
    text = str(raw).strip().lower().replace(" ", "")
    if text in ("all", "none"):
        return text
    kind, sep, arg = text.partition(":")
    if sep and kind == "budget":
        return f"budget:{parse_budget(arg, source, fraction_only=True):g}"
    if sep and kind in _POLICY_KINDS and arg.isdigit() and int(arg) >= 1:
        return f"{kind}:{int(arg)}"
    raise ValueError(
        f"{source} must be one of all, none, every:N, first:K, last:K (positive integers) or budget:F "
        f"(0 < F <= 1, or a percentage), got {raw!r}."
    )


def _parse_ac_strategy(raw: object, source: str) -> Strategy:
    """Parses what each chosen block gets: any strategy but ``none`` (see ``parse_strategy``)."""
    strategy = parse_strategy(str(raw), source)
    if isinstance(strategy, NoCheckpoint):
        allowed = [spelling for spelling in STRATEGIES if spelling != "none"]
        raise ValueError(f"{source} must be one of {', '.join(allowed)}; got {raw!r}.")
    return strategy


def _parse_shape(raw: object, source: str) -> tuple[int, ...]:
    """Parses a tensor shape: positive integers separated by commas or ``x``, or a list of them."""
    items = raw if isinstance(raw, (list, tuple)) else str(raw).lower().replace("x", ",").split(",")
    texts = [str(item).strip() for item in items]
    if not texts or not all(text.isdigit() and int(text) >= 1 for text in texts) or isinstance(raw, bool):
        raise ValueError(
            f"{source} must be a shape of positive integers, e.g. 4,1024 (batch, sequence), got {raw!r}."
        )
    return tuple(int(text) for text in texts)


def _parse_existing_file(raw: object, source: str) -> Path:
    """Parses the path of a file that must exist."""
    path = Path(str(raw)).expanduser()
    if not path.is_file():
        raise ValueError(f"{source} names {str(raw)!r}, which is not a file.")
    return path


SETTING_PARSERS: dict[str, Callable[[object, str], object]] = {
    "policy": _parse_ac_policy,
    "strategy": _parse_ac_strategy,
    "plan": _parse_existing_file,
    "blocks": _parse_class_names,
    "offload": parse_bool,
    "offload_min_bytes": _parse_byte_count,
    "pin_memory": parse_bool,
    "sample_shape": _parse_shape,
}
"""The settings of the Accelerate integration: ``FSDP_AC_<NAME>`` in the environment,
``fsdp_ac_<name>`` in a config file, each read by its parser."""
