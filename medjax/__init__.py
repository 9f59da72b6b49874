"""medjax: Stable Diffusion in JAX/Flax, adapted to medical imaging."""
__version__ = "0.1.0"


def __getattr__(name):
  # Lazy, so `import medjax.data` (or the errors module) does not build the model stack.
  if name == "StableDiffusion":
    from medjax.pipeline import StableDiffusion  # pylint: disable=g-import-not-at-top
    return StableDiffusion
  raise AttributeError(f"module 'medjax' has no attribute {name!r}")
