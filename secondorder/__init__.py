"""secondorder: curvature-aware optimizers for JAX as composable optax transformations."""

__version__ = "0.1.0"
