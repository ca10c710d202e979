"""The paper's method: losses (Eq. 1-3, 7-9), bank (Eq. 4), relations (Eq. 5-6), App. D, T."""
