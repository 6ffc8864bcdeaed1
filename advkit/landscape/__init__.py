"""Loss landscapes (Li et al. 2018): directions, the surface engine and files, sharpness, studies, the
Hessian bridge, replicates."""
