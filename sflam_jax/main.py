"""Command line: ``python -m sflam_jax.main --config configs/default.py --workdir runs/default``.

Config fields can be overridden on the command line, e.g. ``--config.num_rounds=5``.
"""

import sys

from absl import app, flags, logging
from ml_collections import config_flags

from sflam_jax import train
from sflam_jax.errors import SflamError

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config file.")
_WORKDIR = flags.DEFINE_string(
    "workdir", None, "Run directory (metrics, checkpoints); the same command resumes from it."
)
_FRESH = flags.DEFINE_bool(
    "fresh", False, "Delete the workdir's checkpoints and metrics and start from round 0."
)
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
    del argv
    # Orbax logs every checkpoint step at INFO; the progress bar is the run's display.
    logging.set_verbosity(logging.WARNING)
    try:
        train.train_and_evaluate(_CONFIG.value, _WORKDIR.value, fresh=_FRESH.value)
    except SflamError as e:
        # A known stop: its message says what happened and what to do; no traceback.
        sys.exit(f"sflam_jax: {e}")


if __name__ == "__main__":
    app.run(main)
