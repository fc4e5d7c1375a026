"""Built-in tasks; importing this package registers them."""
from . import vae  # noqa: F401
