"""Training and evaluation data generators (`shapes`: the synthetic coloured-shapes editing task)."""
