"""Loss landscapes: 1D lines, 2D grids, interpolations and planes of clean and robust loss.

theta(alpha, beta) = theta* + alpha d1 + beta d2 (Li et al. 2018; Xu et al. 2019, Eq. 5-6),
with directions from `advkit.directions`. Its modules, one concern each:

- `engine`: the batched evaluator (functional_call on one flat weight buffer, vmap, BatchNorm
  folding, torch.compile); `precision`: the precision choice at a surface's own points
  (`choose_surface_precision`, `probe_points`; the centre-only `autocast_error`, `choose_precision`);
- `settings`, `files`, `surfaces`: `SurfaceSettings` (a surface's options, cache key and file
  attributes), netCDF files under the one cache policy, `compute_surface` and its line / grid /
  interpolation / plane forms, and notebook 04's set (`model_surfaces`);
- `sharpness`: numbers for "sharper" (quadratic fit, mean increase, tables);
- `studies`: the sensitivity of the ordering to normalization and span.

Everything public is importable from `advkit.landscape`.
"""

from advkit.landscape.engine import Engine, conv_bn_pairs
from advkit.landscape.precision import (AUTOCAST_TOLERANCE, PrecisionChoice, autocast_error, choose_precision,
                                        choose_surface_precision, probe_points)
from advkit.landscape.files import cached_surface, load_surface, settings_of, write_surface
from advkit.landscape.settings import (BN_MODES, LONG_NAMES, QUANTITIES, ROBUST_MODES, SurfaceSettings,
                                       auto_points_per_forward, coordinates, settings_with)
from advkit.landscape.sharpness import (centre_value, check_radius, half_span, mean_increase, quadratic_fit,
                                        sharpness_summary, sharpness_table)
from advkit.landscape.studies import (METRICS, sensitivity_analysis, sensitivity_summary, sensitivity_surfaces,
                                      sensitivity_table)
from advkit.landscape.surfaces import (SURFACE_KINDS, compute_surface, grid, interpolation, interpolation_pairs,
                                       line, model_surfaces, plane)
from advkit._torch import PRECISIONS

__all__ = [
    "AUTOCAST_TOLERANCE", "BN_MODES", "LONG_NAMES", "METRICS", "PRECISIONS", "QUANTITIES", "ROBUST_MODES",
    "SURFACE_KINDS", "Engine", "PrecisionChoice", "SurfaceSettings", "auto_points_per_forward", "autocast_error",
    "cached_surface", "centre_value", "check_radius", "choose_precision", "choose_surface_precision",
    "compute_surface", "conv_bn_pairs", "coordinates", "grid", "half_span", "interpolation", "interpolation_pairs",
    "line", "load_surface", "mean_increase", "model_surfaces", "plane", "probe_points", "quadratic_fit",
    "sensitivity_analysis", "sensitivity_summary", "sensitivity_surfaces", "sensitivity_table", "settings_of",
    "settings_with", "sharpness_summary", "sharpness_table", "write_surface",
]
