"""Base-correct preview sampling (the exponential-shift sigma grid, real CFG) and the checkpoint x prompt grid."""
