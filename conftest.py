"""Keep test runs (pytest and nbval) out of runs/ and figures/ unless asked otherwise."""

import os
import tempfile

_scratch = tempfile.mkdtemp(prefix="advkit-test-")
os.environ.setdefault("ADVKIT_RUNS_DIR", os.path.join(_scratch, "runs"))
os.environ.setdefault("ADVKIT_FIGURES_DIR", os.path.join(_scratch, "figures"))
