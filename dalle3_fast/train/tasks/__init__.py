"""Built-in tasks; importing this package registers them."""
from . import decoder, vae  # noqa: F401
