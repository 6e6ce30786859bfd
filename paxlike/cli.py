"""Command-line plumbing shared by paxlike's tools (train, plan, aot).

Each tool takes `--config=experiments/<family>.py:<size>` plus `--config.KEY=VALUE` overrides
(ml_collections config flags on absl), and reports every problem with the user's input as one
line, `paxlike: error: ...`, with exit status 2 instead of a traceback.
"""

from __future__ import annotations

import os
import sys

from absl import app, flags, logging
from ml_collections import config_flags

from paxlike import experiments
from paxlike.errors import UserError

DEFAULT_CONFIG = os.path.join(os.path.dirname(experiments.__file__), "transformer.py") + ":tiny"


def fail(message: str) -> None:
    logging.flush()
    print(f"paxlike: error: {message}", file=sys.stderr)
    sys.exit(2)


def config_error(e: Exception) -> str:
    """One line describing why the config could not be loaded or overridden."""
    if isinstance(e, (AttributeError, KeyError)):  # ml_collections: override of a missing key
        text = str(e).strip("'\"").replace("\\n", "; ").replace("\\'", "'")
        return f"unknown config key in --config.KEY=VALUE: {text}"
    root = e
    while root.__cause__ is not None or root.__context__ is not None:
        root = root.__cause__ or root.__context__
    lines = [line.strip() for line in str(root).splitlines() if line.strip()]
    if isinstance(root, OSError) and not isinstance(root, FileNotFoundError):
        return f"cannot load the --config file: {lines[-1] if lines else root}"
    if isinstance(root, FileNotFoundError):
        return f"--config file not found: {root.filename or root}"
    return f"--config: {lines[-1] if lines else type(root).__name__}"


def parse_flags_with_config(argv, default: str = DEFAULT_CONFIG):
    """absl flag parsing plus the --config flag; config problems become one line (exit 2).

    Returns (remaining argv, the config flag holder: `.value` is the locked, overridden config).
    """
    try:
        holder = config_flags.DEFINE_config_file(
            "config", default, "Experiment config file and size, e.g. "
            "experiments/transformer.py:tiny. Override any key with --config.KEY=VALUE.",
            lock_config=True)
        parsed = flags.FLAGS(argv)
        holder.value.to_dict()  # the config file loads lazily; make a broken one fail here
        return parsed, holder
    except flags.Error as e:
        message = str(e)
        fail(config_error(e) if "parsing config file" in message else message)
    except Exception as e:  # noqa: BLE001 - every config failure becomes one clear line
        fail(config_error(e))


def config_argument(default: str = DEFAULT_CONFIG) -> str:
    """The --config value as given (file:size), for names and messages."""
    return flags.FLAGS["config"].serialize().partition("=")[2] or default


def run(main, default: str = DEFAULT_CONFIG) -> None:
    """Runs a tool: absl flags plus --config, then `main(config)` with the loaded, overridden
    config. Positional arguments are a usage error; a UserError from main becomes the one-line
    `paxlike: error: ...` with exit status 2."""
    holder = None

    def parse(argv):
        nonlocal holder
        parsed, holder = parse_flags_with_config(argv, default)
        return parsed

    def checked_main(argv):
        if len(argv) > 1:
            raise app.UsageError(f"unexpected arguments {argv[1:]}; flags look like --name=value")
        try:
            main(holder.value)
        except UserError as e:
            fail(str(e))
    app.run(checked_main, flags_parser=parse)
