"""What every command shares: quiet logging, and errors as one line with exit code 2."""

import logging
import os
import sys
import warnings
from collections.abc import Callable

import huggingface_hub
import transformers

from sw_lens.errors import SwLensError


def run(main: Callable[[], None]) -> None:
    """Call `main`; a `SwLensError` becomes ``error: ...`` and exit 2, Ctrl-C exit 130."""
    logging.basicConfig(level=logging.ERROR, format="%(message)s")
    logging.getLogger("sw_lens").setLevel(logging.INFO)
    warnings.filterwarnings("ignore")
    transformers.utils.logging.disable_progress_bar()  # weight-loading bars, not our work
    transformers.utils.logging.set_verbosity_error()
    huggingface_hub.utils.logging.set_verbosity_error()  # retries are summed up in our error
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        main()
    except SwLensError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted: no results were written", file=sys.stderr)
        sys.exit(130)
