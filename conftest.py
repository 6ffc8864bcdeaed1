"""Keep test runs (pytest and nbval) out of runs/, figures/ and ~/.cache unless asked otherwise; load the nbval
tolerance."""

import os
import tempfile

# nbval: decimals within a tolerance, everything else exactly (see tools/nbval_tolerance.py)
pytest_plugins = ["tools.nbval_tolerance"]

_scratch = tempfile.mkdtemp(prefix="advkit-test-")
os.environ.setdefault("ADVKIT_RUNS_DIR", os.path.join(_scratch, "runs"))
os.environ.setdefault("ADVKIT_FIGURES_DIR", os.path.join(_scratch, "figures"))
# the plan's measured unit costs: measured once per test session, never into the user's ~/.cache
os.environ.setdefault("ADVKIT_CACHE_DIR", os.path.join(_scratch, "cache"))
