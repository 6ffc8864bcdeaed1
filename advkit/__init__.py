"""advkit: adversarial robustness through loss-landscape geometry.

Modules, one concept each: data, models, objectives, train, attacks, evaluate,
landscape, flatness, plots, widgets, runs, pipeline. See README.md.
"""

__version__ = "0.1.0"
