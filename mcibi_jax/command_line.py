"""The command lines of every program: absl flags, ``--config=FILE[:arg]`` and
``--config.<key>=<value>`` overrides, which ``ml_collections.config_flags`` applies.

    command = CommandLine("python -m mcibi_jax.port", __doc__, config="config file ...")
    out = flags.DEFINE_string("out", None, "new directory", flag_values=command.flags)
    command.parse(argv)            # one-line errors, exit status 2; --help: exit status 0
    command.config, out.value

Each :class:`CommandLine` has its own ``absl.flags.FlagValues``, so a ``main(argv)`` can run
many times in one process; ``python -m mcibi_jax.main`` passes ``absl.flags.FLAGS`` for
``absl.app.run``.
"""

from __future__ import annotations

import sys
import textwrap
from collections.abc import Sequence
from typing import Any, NoReturn, TextIO

import ml_collections
from absl import flags
from ml_collections import config_flags

from mcibi_jax import pretrained
from mcibi_jax.config import ConfigError, load_config, parent_of, parse_value

HELP_FLAGS = ("-h", "-?", "--help", "--helpshort", "--helpfull", "-help", "-helpshort", "-helpfull")
OVERRIDE_HELP = (
    "--config.<key>=<value> changes one value of the config, e.g. --config.model.num_classes=7 "
    "(a Python literal, else a string; --config.<key> alone sets a boolean to True)"
)


# The message of absl's validator for a flag marked required (mark_flag_as_required).
REQUIRED_MARKER = " must have a value other than None"

# Tuple config fields whose length is free (the other tuples are sizes, pairs, RGB values).
VARIABLE_LENGTH = frozenset({"flip_label_pairs", "selected_indices", "out_indices"})


class UsageError(Exception):
    """A command-line mistake (its message is the one line printed after ``error:``)."""


def usage_error(message: Any, stream: TextIO | None = None) -> NoReturn:
    """Prints ``error: message`` on ``stream`` (stderr) and exits with status 2."""
    print(f"error: {message}", file=stream or sys.stderr, flush=True)
    raise SystemExit(2)


def flag_value(argv: Sequence[str], name: str) -> str | None:
    """The value of ``--name=V`` / ``--name V`` (the last one) in an absl command line, else None."""
    value = None
    for i, arg in enumerate(argv):
        for prefix in (f"--{name}", f"-{name}"):
            if arg.startswith(prefix + "="):
                value = arg[len(prefix) + 1 :]
            elif arg == prefix and i + 1 < len(argv):
                value = argv[i + 1]
    return value


def override_keys(argv: Sequence[str]) -> list[str]:
    """The keys of the ``--config.<key>[=<value>]`` arguments of a command line."""
    return [
        arg.split("config.", 1)[1].split("=", 1)[0]
        for arg in argv
        if arg.startswith(("--config.", "-config.", "--noconfig.", "-noconfig."))
    ]


def flags_error_message(error: Exception, program: str = "") -> str:
    """One line for an absl ``flags.Error`` (a missing required flag, an unknown flag, a bad value)."""
    text = "; ".join(line.strip() for line in str(error).splitlines() if line.strip())
    see = f"(see {program} --help)" if program else "(see --helpshort)"
    # absl's "flag --x=None: Flag --x must have a value other than None."
    if REQUIRED_MARKER in text:
        name = text.split(REQUIRED_MARKER)[0].rsplit("Flag ", 1)[-1]
        return f"{name} is required {see}"
    return f"{text} {see}"


class _ListParser(flags.ArgumentParser):
    """Lets ``config_flags`` override list fields (``model.inference.multiscale=[0.5, 1.0]``),
    as it does tuples: the value is a Python literal list or tuple."""

    def parse(self, argument: Any) -> list:
        value = parse_value(argument) if isinstance(argument, str) else argument
        if not isinstance(value, (list, tuple)):
            raise ValueError(f"expected a list such as [1, 2], got {argument!r}")
        return list(value)

    def flag_type(self) -> str:
        return "list"


config_flags.register_flag_parser_for_type(list, _ListParser())


class CommandLine:
    """The flags of one run of a program: ``self.flags`` (define the program's flags on it with
    ``flag_values=command.flags``), with ``--config`` (required; see :meth:`parse` for ``--pretrained``) when ``config`` (its help) is
    given.

    Args:
      program: how the program is called, e.g. ``python -m mcibi_jax.port``.
      description: what ``--help`` prints above the flags (the module docstring).
      config: the help of ``--config``; None: the program takes no config.
      flag_values: where the flags go (default: a new ``FlagValues``).
    """

    def __init__(
        self,
        program: str,
        description: str,
        *,
        config: str | None = None,
        flag_values: flags.FlagValues | None = None,
    ):
        self.program, self.description = program, description.strip()
        self.flags = flags.FlagValues() if flag_values is None else flag_values
        # Flags already there (absl's logging, debugging and help flags on absl.flags.FLAGS)
        # are not the program's own: --help leaves them to --helpfull.
        self._foreign = frozenset(self.flags)
        # The command line config_flags reads the --config.<key> overrides from (set by parse).
        self._config_argv: list[str] = []
        self._config = None
        if config is not None:
            self._config = config_flags.DEFINE_config_file(
                "config",
                None,
                config,
                flag_values=self.flags,
                sys_argv=self._config_argv,
                lock_config=True,
            )

    @property
    def config(self) -> ml_collections.ConfigDict | None:
        """The config with its overrides (locked), after :meth:`parse`; None without ``--config``."""
        return None if self._config is None else self._config.value

    def help(self, full: bool = False) -> str:
        """The description, then the program's own flags (``full``: every flag, absl's too),
        the required ones marked."""
        listing, names = [], sorted({self.flags[name].name for name in self.flags})
        foreign = [name for name in names if not self._own(name)]
        for name in names:
            if name in foreign and not full:
                continue
            flag, single = self.flags[name], flags.FlagValues()
            single[name] = flag
            listing += single.get_help(prefix="  ", include_special_flags=False).splitlines()
            if self._required(flag):
                listing.append("    (required)")
        extra = "\n\n" + textwrap.fill(OVERRIDE_HELP, 80) if self._config is not None else ""
        if foreign and not full:
            extra += "\n\n--helpfull lists absl's flags too (logging, debugging, profiling)"
        listed = "\n\nflags:\n" + "\n".join(listing) if listing else ""
        return f"{self.description}{listed}{extra}"

    def _own(self, name: str) -> bool:
        """Whether ``name`` is one of the program's flags, not absl's (absl.app defines its help
        flags when it runs) or another library's."""
        module = self.flags.find_module_defining_flag(name) or ""
        return name not in self._foreign and not module.startswith("absl.")

    def _required(self, flag: flags.Flag) -> bool:
        """Whether ``flag`` must be given: marked required, or ``--config`` where no
        ``--pretrained`` can stand for it."""
        if self._config is not None and flag.name == "config":
            return "pretrained" not in self.flags
        return any(REQUIRED_MARKER in str(v.message) for v in flag.validators)

    def parse(
        self,
        argv: Sequence[str] | None = None,
        *,
        positional: bool = False,
        pretrained_config: bool = False,
        stdout: TextIO | None = None,
        stderr: TextIO | None = None,
    ) -> list[str]:
        """Parses ``argv`` (without the program name; default ``sys.argv[1:]``) and returns its
        positional arguments.

        ``--help`` (``-h``, ``--helpshort``) prints :meth:`help` and exits with status 0; a
        mistake (a missing or broken config file, an unknown config key, a missing, unknown or
        bad flag, positional arguments where ``positional`` is False) prints one ``error:`` line
        and exits with status 2. With ``pretrained_config``, ``--pretrained=NAME`` without
        ``--config`` parses as if ``--config`` named the release's recipe
        (:meth:`mcibi_jax.pretrained.Release.config_spec`).
        """
        argv = list(sys.argv[1:] if argv is None else argv)
        flag_part = argv[: argv.index("--")] if "--" in argv else argv
        if any(arg in HELP_FLAGS for arg in flag_part):
            full = any(arg in ("--helpfull", "-helpfull") for arg in flag_part)
            print(self.help(full), file=stdout or sys.stdout, flush=True)
            raise SystemExit(0)
        try:
            return self._parse(argv, positional, pretrained_config)
        except (ConfigError, UsageError) as error:
            usage_error(error, stderr)
        except flags.Error as error:
            usage_error(flags_error_message(error, self.program), stderr)

    def _parse(self, argv: list[str], positional: bool, pretrained_config: bool) -> list[str]:
        if self._config is not None:
            spec = flag_value(argv, "config")
            name = flag_value(argv, "pretrained") if pretrained_config else None
            if spec is None and name:
                spec = pretrained.get(name).config_spec()
                argv = [f"--config={spec}", *argv]
            if spec is None:
                alternative = "; it may be left out with --pretrained" if pretrained_config else ""
                raise UsageError(f"--config is required{alternative} (see {self.program} --help)")
            # a broken file or an unknown key: our one line, not a traceback
            config = load_config(spec)
            for key in override_keys(argv):
                parent_of(config, key)
        argv = [self.program, *argv]
        self._config_argv[:] = argv
        rest = self.flags(argv)[1:]
        if self._config is not None:
            self._check_tuple_lengths(config, override_keys(argv))
        if rest and not positional:
            raise UsageError(f"unexpected arguments {' '.join(rest)} (see {self.program} --help)")
        return rest

    def _check_tuple_lengths(self, default: ml_collections.ConfigDict, keys: list[str]) -> None:
        """A UsageError for an override of a fixed-length tuple (a size, a pair, RGB values)
        with another number of values: config_flags turns ``--config.dataset.image_size=64``
        into ``(64,)``, which would only fail deep inside the run."""
        for key in keys:
            node, leaf = parent_of(default, key)
            expected = node[leaf]
            if not isinstance(expected, tuple) or not expected or leaf in VARIABLE_LENGTH:
                continue
            given_node, _ = parent_of(self.config, key)
            given = given_node[leaf]
            if isinstance(given, tuple) and len(given) != len(expected):
                raise UsageError(
                    f"--config.{key.strip()} takes {len(expected)} values, got {len(given)}: "
                    f'{given}; e.g. --config.{key.strip()}="{expected}"'
                )

    def one_of(self, names: Sequence[str], *, required: bool = True) -> str | None:
        """The one flag of ``names`` that was given (None when none was and not ``required``);
        a usage error, exit status 2, for more than one, or none when ``required``."""
        given = [name for name in names if self.flags[name].value is not None]
        listed = " | ".join(f"--{name}" for name in names)
        if len(given) > 1:
            usage_error(f"{' and '.join(f'--{n}' for n in given)} exclude each other: {listed}")
        if not given and required:
            usage_error(f"one of {listed} is required (see {self.program} --help)")
        return given[0] if given else None
