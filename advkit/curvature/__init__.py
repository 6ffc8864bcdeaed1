"""Curvature of the loss in weight space: the Hessian operator, estimators that take any operator, flatness
measures and Walter et al.'s local analysis."""
