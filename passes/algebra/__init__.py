"""Pure tensor algebra of re-parameterization (no torch.fx): kernels and the forms they compose into."""
