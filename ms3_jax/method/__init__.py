"""The paper's method: the losses (Eq. 1-3, 7-9), memory bank (Eq. 4), relations (Eq. 5-6), pseudo-labels (App. D), T."""
