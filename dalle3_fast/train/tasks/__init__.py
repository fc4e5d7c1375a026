"""Built-in tasks; importing this package registers them. A task whose model is missing is skipped."""
