"""advkit: adversarial robustness through loss-landscape geometry.

Concept folders, imports flowing one way (docs/architecture.md): the core modules (`_checks`, `_torch`,
`folding`, `ranks`, `progress`, `reproducibility`, `models`), then `runs`, `data`, `attacks`, `training`,
`curvature`, `landscape`, `studies`, `plots` and, on top, `pipeline` (the notebooks' parameters,
profiles and driver).
"""

__version__ = "0.1.0"
