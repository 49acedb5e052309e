"""Integrations with other libraries' models: fastdiff's fused kernels inside their modules."""
