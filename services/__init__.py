"""knowstream services: one package per service plus the shared library in ``services.common``."""
