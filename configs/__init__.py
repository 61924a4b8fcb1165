"""The experiment configs, a ``get_config(arg)`` each
(``python -m mcibi_jax.main --config=configs/<file>.py:<arg>``).

The package reads them as ``mcibi_jax.configs`` (mcibi_jax/configs links to this folder, and
a non-editable install copies it there): ``mcibi_jax.recipes.released_config`` loads the
released recipes from here.
"""
