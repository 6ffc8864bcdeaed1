"""advkit: adversarial robustness through loss-landscape geometry.

One concept per module (docs/architecture.md): the shared layer (`_checks`, `_torch`), data,
models, objectives and variants, train, attacks, evaluate, directions, the `landscape` package,
hessian, flatness, zoo and correlation, plots and widgets, runs (the run directory), params (the
declaration of every notebook parameter) and pipeline (profiles and the papermill driver).
"""

__version__ = "0.1.0"
