"""JAX's persistent compilation cache for the command-line programs.

A restarted run (a resume after preemption, an evaluation of a new checkpoint, a second
prediction) loads its compiled programs from disk instead of compiling them again: on an H200
the Cityscapes R-50 train step alone compiles in 44 s and its initialisation in 20 s.

``$MCIBI_COMPILATION_CACHE`` picks the folder: unset, ``<cache>/xla`` (``<cache>`` is
``$MCIBI_CACHE`` or ``~/.cache/mcibi_jax``, as for the released weights); ``off`` (or empty),
no cache. Programs that compile in under a second are not stored (JAX's default). The folder
only grows; delete it to reclaim the space, nothing else is kept there.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import jax

ENV = "MCIBI_COMPILATION_CACHE"
OFF = ("", "off", "0", "none")

log = logging.getLogger(__name__)


def cache_folder() -> Path | None:
    """The folder ``$MCIBI_COMPILATION_CACHE`` names (None: off)."""
    value = os.environ.get(ENV)
    if value is None:
        from mcibi_jax.pretrained import cache_dir

        return cache_dir() / "xla"
    if value.strip().lower() in OFF:
        return None
    return Path(value).expanduser()


def enable() -> Path | None:
    """Turns the cache on in :func:`cache_folder` (unless it is off, or another folder was set
    through JAX's own ``jax_compilation_cache_dir``); returns the folder in use."""
    configured = jax.config.jax_compilation_cache_dir
    if configured:
        return Path(configured)
    folder = cache_folder()
    if folder is None:
        return None
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as error:  # a read-only home: run without the cache
        log.warning("compilation cache off: cannot create %s (%s)", folder, error)
        return None
    jax.config.update("jax_compilation_cache_dir", str(folder))
    return folder
