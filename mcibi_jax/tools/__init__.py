"""Command-line utilities (``python -m mcibi_jax.tools.<name>``)."""
