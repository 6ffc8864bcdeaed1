"""Training: fit, adversarial-training objectives and variants, regularizers, Xu et al.'s augmentation,
robust overfitting."""
