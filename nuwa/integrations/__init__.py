"""Integrations of nuwa_kernels' nearby attention into third-party models (optional dependencies)."""
