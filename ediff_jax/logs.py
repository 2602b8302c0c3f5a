"""Console output: our progress lines on process 0; library chatter (orbax, TF) hidden.

Orbax logs every checkpoint file operation at INFO through absl; a researcher watching a
run wants the loss, not that. `-v 1` (absl's flag) brings those logs back.
"""

from __future__ import annotations

import sys

import jax
from absl import flags, logging as absl_logging


def quiet_library_logs() -> None:
    """Shows absl WARNING and above unless the user asked for a verbosity explicitly."""
    if not (flags.FLAGS.is_parsed() and flags.FLAGS["verbosity"].present):
        absl_logging.set_verbosity(absl_logging.WARNING)


def info(message: str) -> None:
    """A progress line for the user, printed once per job (process 0)."""
    if jax.process_index() == 0:
        print(message, file=sys.stderr, flush=True)
