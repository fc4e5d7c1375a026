"""Built-in tasks; importing this package registers them."""
from . import captioner, decoder, unet, vae  # noqa: F401
