"""Runs an unmodified training script with Accelerate's activation checkpointing done by fsdp_ac.

::

    accelerate launch --config_file cfg.yaml -m fsdp_ac.run train.py --its --arguments
    torchrun --nproc_per_node 2 -m fsdp_ac.run train.py --its --arguments
    python -m fsdp_ac.run -m package.module --its --arguments

It calls :func:`fsdp_ac.accelerate.enable` (reading and checking every setting before the script
runs; with none given, every block is checkpointed, as ``policy: all``), so every
``Accelerator.prepare`` of the run (those that Hugging Face ``Trainer`` and TRL's trainers make
included) goes through :func:`fsdp_ac.accelerate.prepare`, then runs the script as ``__main__``
with its own arguments, as ``python train.py`` would: ``sys.argv[0]`` is the script and its
directory comes first on ``sys.path``. The settings are those of :mod:`fsdp_ac.accelerate`: the config file's
``fsdp_activation_checkpointing`` flag and ``fsdp_ac_*`` keys, and the ``FSDP_AC_*`` variables;
``FSDP_AC_POLICY=none`` turns checkpointing off.
"""

from __future__ import annotations

import os
import runpy
import sys
from collections.abc import Sequence
from pathlib import Path

import fsdp_ac.accelerate
from fsdp_ac.report import notice
from fsdp_ac.settings import launch_config_file, launcher

__all__ = ["main"]

_USAGE = "python -m fsdp_ac.run SCRIPT.py [ARGS...]  or  python -m fsdp_ac.run -m MODULE [ARGS...]"


def main(argv: Sequence[str] | None = None) -> None:
    """Enables fsdp_ac's routing of ``Accelerator.prepare`` and runs a script or module as ``__main__``.

    Args:
        argv: The runner's arguments, ``sys.argv[1:]`` when None: a script path, or ``-m`` and a
            module name, then the arguments the script gets.

    Raises:
        SystemExit: No script was given (the message shows the usage).
        RuntimeError: See :func:`fsdp_ac.accelerate.enable`.
    """
    args = list(sys.argv[1:] if argv is None else argv)
    module = bool(args) and args[0] == "-m"
    if module:
        args.pop(0)
    if not args or args[0].startswith("-"):
        raise SystemExit(f"fsdp_ac.run needs the training script to run. Usage: {_USAGE}")
    target, script_args = args[0], args[1:]
    if not module and not Path(target).is_file():
        raise SystemExit(f"fsdp_ac.run: no such training script: {target}. Usage: {_USAGE}")
    fsdp_ac.accelerate.enable(default_policy="all")
    if launcher() == "accelerate launch" and not os.environ.get("FSDP_AC_CONFIG_FILE"):
        if launch_config_file() is None:  # not Linux, or a launch without any config file
            notice(
                "found no config file of accelerate launch; reading FSDP_AC_* variables only (set "
                "FSDP_AC_CONFIG_FILE to read the fsdp_ac_* keys of one)"
            )
    sys.argv = [target, *script_args]
    if module:
        runpy.run_module(target, run_name="__main__", alter_sys=True)
        return
    sys.path.insert(0, str(Path(target).resolve().parent))
    runpy.run_path(target, run_name="__main__")


if __name__ == "__main__":
    main()
