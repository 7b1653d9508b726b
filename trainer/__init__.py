"""jaxjob trainer: one data-parallel JAX training loop from a laptop CPU to a TPU pod."""
