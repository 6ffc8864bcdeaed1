"""Adversarial attacks (FGSM, PGD, APGD/AutoAttack, stAdv) on one shared ascent loop, and their evaluation."""
