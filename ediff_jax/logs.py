"""Console output: our progress lines on process 0; library chatter (orbax, TF) hidden.

Orbax logs every checkpoint file operation at INFO through absl; a researcher watching a
run wants the loss, not that. `-v 1` (absl's flag) brings those logs back.

The command lines call `quiet_startup_banners()` before TensorFlow or transformers is
imported, and end on a user's mistake with `fail()`: one line on stderr, no traceback.
"""

from __future__ import annotations

import contextlib
import os
import sys
from typing import Iterator, NoReturn

import jax
from absl import flags, logging as absl_logging


# Start-up banners that greet every run and ask nothing of the user. Set only where unset,
# so exporting a variable brings its output back. Real warnings are untouched: TF's C++
# errors, transformers' warnings and our own warnings.warn still print.
STARTUP_QUIET_ENV = {
    "TF_CPP_MIN_LOG_LEVEL": "2",  # TF's C++ INFO/WARNING lines (CPU-feature guard, ...)
    # "oneDNN custom operations are on ..." (twice) ignores TF_CPP_MIN_LOG_LEVEL; only turning
    # the option off hides it. TF only loads data here, where oneDNN's round-off is immaterial.
    "TF_ENABLE_ONEDNN_OPTS": "0",
    # transformers' advisory lines only, e.g. "PyTorch was not found. Models won't be available
    # ..." (we use its tokenizers and configs; the encoders are our own Flax code).
    "TRANSFORMERS_NO_ADVISORY_WARNINGS": "1",
}


def quiet_startup_banners() -> None:
    """Hides library start-up banners; effective only before TensorFlow/transformers are imported."""
    for name, value in STARTUP_QUIET_ENV.items():
        os.environ.setdefault(name, value)


def quiet_library_logs() -> None:
    """Shows absl WARNING and above unless the user asked for a verbosity explicitly."""
    quiet_startup_banners()
    if not (flags.FLAGS.is_parsed() and flags.FLAGS["verbosity"].present):
        absl_logging.set_verbosity(absl_logging.WARNING)


def fail(problem: object) -> NoReturn:
    """Ends a command line on a user's mistake: `error: PROBLEM` as one line on stderr, exit status 1.

    The message should name the problem and the fix; the traceback would only hide it.
    """
    sys.exit("error: " + " ".join(str(problem).split()))


@contextlib.contextmanager
def user_errors(*kinds: type[BaseException]) -> Iterator[None]:
    """`with user_errors(ValueError, ...)`: those exceptions end the command line through `fail`."""
    try:
        yield
    except kinds as e:
        fail(e)


def info(message: str) -> None:
    """A progress line for the user, printed once per job (process 0)."""
    if jax.process_index() == 0:
        print(message, file=sys.stderr, flush=True)


def warning(message: str) -> None:
    """Something the user should act on or know (a resumed run's changed setting): a
    UserWarning, so it prints once per job and tests and notebooks can catch it."""
    if jax.process_index() == 0:
        import warnings

        warnings.warn(message, UserWarning, stacklevel=2)
