"""Command-line plumbing shared by paxlike's tools (train, plan, aot, btm).

Each tool takes `--config=experiments/<family>.py:<size>` plus `--config.KEY=VALUE` overrides
(ml_collections config flags on absl), in any order, and reports every problem with the user's
input as one line, `paxlike: error: ...`, with exit status 2 instead of a traceback. A config
path `experiments/<file>.py` that does not exist relative to the current directory is the
experiment file bundled with paxlike (the `paxlike.experiments` package), so the tools run from
any directory.
"""

from __future__ import annotations

import importlib.util
import logging as py_logging
import os
import re
import sys
from collections.abc import Mapping

from absl import app, flags, logging
from ml_collections import config_flags

from paxlike.errors import UserError

_EXPERIMENTS = "experiments"


def _experiment_dirs() -> list[str]:
    """Folders of the bundled experiment files. `find_spec` imports only the parent package
    (`paxlike`), not the experiments themselves."""
    spec = importlib.util.find_spec(f"paxlike.{_EXPERIMENTS}")
    return list(spec.submodule_search_locations or []) if spec is not None else []


def bundled_config(path: str) -> str:
    """A config file path as given when it exists; else, for `experiments/<file>.py`, the bundled
    experiment file of that name when there is one (else the path as given)."""
    if os.path.exists(path):
        return path
    parts = os.path.normpath(path).split(os.sep)
    if len(parts) < 2 or parts[0] != _EXPERIMENTS:
        return path
    for folder in _experiment_dirs():
        candidate = os.path.join(folder, *parts[1:])
        if os.path.isfile(candidate):
            return candidate
    return path


DEFAULT_CONFIG = bundled_config(os.path.join(_EXPERIMENTS, "transformer.py")) + ":tiny"

_CONFIG_ARG = re.compile(r"^(-{1,2}config)(=|$)")   # --config=VALUE or --config VALUE
_given_config: str | None = None                    # the --config value as typed, for names


def config_first(argv: list[str]) -> tuple[list[str], str | None]:
    """argv with every `--config=FILE:SIZE` (or `--config FILE:SIZE`) moved in front of the other
    flags, as `--config=...` with FILE resolved by `bundled_config`: ml_collections refuses a
    `--config.KEY` override placed before the config it overrides. Arguments after `--` stay.
    Also returns the (last) --config value as given, or None."""
    head, configs, rest = list(argv[:1]), [], []
    given = None
    i = 1
    while i < len(argv):
        arg = argv[i]
        if arg == "--":
            rest += argv[i:]
            break
        m = _CONFIG_ARG.match(arg)
        if m is None or (not m.group(2) and i + 1 == len(argv)):  # not ours, or lacks a value
            rest.append(arg)
            i += 1
            continue
        if m.group(2):
            value, i = arg[m.end():], i + 1
        else:
            value, i = argv[i + 1], i + 2
        given = value
        path, colon, size = value.partition(":")
        configs.append(f"{m.group(1)}={bundled_config(path)}{colon}{size}")
    return head + configs + rest, given


def _quiet_library_logs(record) -> bool:
    """Keeps orbax's per-save and per-read INFO chatter out of the terminal (its warnings show)."""
    return record.levelno >= py_logging.WARNING or "/orbax/" not in record.pathname


def log_info_quietly() -> None:
    """absl logging at INFO on stderr, without the libraries' chatter."""
    logging.set_verbosity(logging.INFO)
    logging.get_absl_handler().addFilter(_quiet_library_logs)


def emulate_cpu_devices(count: int | None) -> None:
    """`--cpu_devices=N`: N emulated CPU devices, set before any JAX backend starts (None: the
    machine's own devices)."""
    if count is None:
        return
    if count < 1:
        raise UserError(f"--cpu_devices={count} must be >= 1")
    import jax
    jax.config.update("jax_num_cpu_devices", count)
    jax.config.update("jax_platforms", "cpu")


def compilation_cache_dir(setting: str, env: Mapping[str, str]) -> str | None:
    """The directory for `compilation_cache` ("auto", "off" or a path); None when off. "auto"
    keeps a directory given to jax through JAX_COMPILATION_CACHE_DIR, else the user's cache
    directory (XDG_CACHE_HOME, else ~/.cache)."""
    if setting == "off":
        return None
    if setting != "auto":
        return os.path.expanduser(setting)
    if env.get("JAX_COMPILATION_CACHE_DIR"):
        return env["JAX_COMPILATION_CACHE_DIR"]
    cache_home = env.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(cache_home, "paxlike", "jax")


def setup_compilation_cache(setting: str) -> None:
    """A persistent cache of compiled programs: a restarted or resumed run loads its train step,
    init and eval programs instead of compiling them (benchmarks/compile_cache.py measures it)."""
    import jax
    directory = compilation_cache_dir(setting, os.environ)
    jax.config.update("jax_compilation_cache_dir", directory)
    if directory:
        logging.info("compiled programs are cached in %s (compilation_cache)", directory)


def print_error(message: str) -> None:
    """Prints `paxlike: error: <message>` as one line on stderr."""
    logging.flush()
    line = "; ".join(part.strip() for part in str(message).splitlines() if part.strip())
    print(f"paxlike: error: {line}", file=sys.stderr)


def fail(message: str) -> None:
    """Prints `paxlike: error: <message>` as one line on stderr and exits with status 2."""
    print_error(message)
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
    global _given_config
    argv, _given_config = config_first(argv)
    try:
        holder = config_flags.DEFINE_config_file(
            "config", default, "Experiment config file and size, e.g. "
            "experiments/transformer.py:tiny. Override any key with --config.KEY=VALUE.",
            lock_config=True, sys_argv=argv)  # the overrides are read from this argv
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
    if _given_config is not None:
        return _given_config
    return flags.FLAGS["config"].serialize().partition("=")[2] or default


def run(main, default: str = DEFAULT_CONFIG) -> None:
    """Runs a tool: absl flags plus --config, then `main(config)` with the loaded, overridden
    config. Positional arguments, and a UserError from main, become the one-line
    `paxlike: error: ...` with exit status 2."""
    holder = None

    def parse(argv):
        nonlocal holder
        parsed, holder = parse_flags_with_config(argv, default)
        return parsed

    def checked_main(argv):
        if len(argv) > 1:
            fail(f"unexpected arguments {argv[1:]}; flags look like --name=value")
        try:
            main(holder.value)
        except UserError as e:
            fail(str(e))
    app.run(checked_main, flags_parser=parse)
