"""Studies across models: the zoo table, correlations, published numbers, rescaling audit, robust split."""
