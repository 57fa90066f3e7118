"""clapjax: CLAP (LAION-CLAP) in JAX/Flax NNX."""

__version__ = "0.1.0"


def __getattr__(name):
    # `clapjax.CLAP` without importing jax/transformers at `import clapjax` time
    if name == "CLAP":
        from clapjax.app.api import CLAP
        return CLAP
    raise AttributeError(f"module 'clapjax' has no attribute {name!r}")
