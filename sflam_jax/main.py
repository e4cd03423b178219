"""Command line: ``python -m sflam_jax.main --config configs/default.py --workdir runs/default``.

Config fields can be overridden on the command line, e.g. ``--config.num_rounds=5``. Every bad
input (a field that does not exist, a value out of range, a config file that is missing) ends in
one ``sflam_jax: ...`` line on stderr and exit status 1.
"""

import difflib
import os
import sys

from absl import app, flags, logging
from ml_collections import config_flags

from sflam_jax import train
from sflam_jax.config import base_config, flatten
from sflam_jax.errors import SflamError

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config file.")
_WORKDIR = flags.DEFINE_string(
    "workdir", None, "Run directory (metrics, checkpoints); the same command resumes from it."
)
_FRESH = flags.DEFINE_bool(
    "fresh", False, "Delete the workdir's checkpoints and metrics and start from round 0."
)
flags.mark_flags_as_required(["config", "workdir"])


def _stop(message: str):
    sys.exit(f"sflam_jax: {message}")


def check_arguments(argv: list[str]) -> None:
    """Stops with one line on an override of a field that does not exist or a config file that
    is not there (the flag parser would answer both with chained tracebacks)."""
    known = list(flatten(base_config()))
    args = iter(argv[1:])
    for arg in args:
        name, _, value = arg.lstrip("-").partition("=")
        if not arg.startswith("--") or name.startswith("no"):
            continue
        if name == "config":
            path = (value or next(args, "")).split(":", 1)[0]
            if path and not os.path.isfile(path):
                _stop(f"--config={path!r}: no such config file (see configs/ for the experiments)")
        elif name.startswith("config."):
            field = name.removeprefix("config.")
            if field not in known:
                close = difflib.get_close_matches(field, known, n=1, cutoff=0.6)
                hint = f"; did you mean --config.{close[0]}?" if close else ""
                _stop(f"--{name}: {field!r} is not a config field{hint}")


def parse_flags(argv: list[str]) -> list[str]:
    """absl's flag parsing, with every failure reported as one line."""
    check_arguments(argv)
    try:
        return flags.FLAGS(argv)
    except flags.Error as e:
        _stop(str(e).strip().splitlines()[0])
    except (OSError, ValueError, AttributeError, KeyError) as e:
        # A config file that fails to load or an override that cannot be applied.
        _stop(" ".join(str(e).split()))


def main(argv):
    del argv
    # Orbax logs every checkpoint step at INFO; the progress bar is the run's display.
    logging.set_verbosity(logging.WARNING)
    try:
        train.train_and_evaluate(_CONFIG.value, _WORKDIR.value, fresh=_FRESH.value)
    except SflamError as e:
        # A known stop: its message says what happened and what to do; no traceback.
        _stop(str(e))


if __name__ == "__main__":
    app.run(main, flags_parser=parse_flags)
