"""The notebook layer: parameters, profiles, the papermill driver, stages, plan, sweep, jobs, torchrun."""
