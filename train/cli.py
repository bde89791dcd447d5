"""Shared command line of the entry points: ``--config FILE`` plus dotted overrides (``--train.lr 1e-4``)."""

from __future__ import annotations

import argparse
import sys

from lfvila.config import Config, ConfigError, load_config


def parse(argv: list[str] | None, prog: str, doc: str, task: str | None = None) -> tuple[Config, argparse.Namespace]:
    """``(config, extra args)``: ``--config`` is read, every other ``--section.key value`` is an override; ``task``
    (when given) must match ``train.task``. Config errors exit with the message (naming the key) and status 2."""
    parser = argparse.ArgumentParser(prog=prog, description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="YAML config (see train/configs/)")
    args, rest = parser.parse_known_args(sys.argv[1:] if argv is None else argv)
    try:
        cfg = load_config(args.config, rest)
    except ConfigError as e:
        parser.exit(2, f"{prog}: config error: {e}\n")
    if task is not None and cfg.train.task not in (task if isinstance(task, tuple) else (task,)):
        parser.exit(2, f"{prog}: config error: train.task is {cfg.train.task!r}, this entry point runs {task}\n")
    return cfg, args
