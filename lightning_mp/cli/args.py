"""The command line as a shell passes it, made into Hydra's, and checked before anything runs.

- ``recipe=<name>`` picks the primary config (a recipe extends ``conf/train.yaml``).
- A value Hydra's grammar cannot read as it is (``data.path=~/corpus``: a shell expands no ``~``
  after ``=``; ``ckpt_path=.../best-step=30.ckpt``) is quoted for it; paths expand ``~`` later.
- The overrides are composed once before Hydra runs them: a key that does not exist, an option
  a group lacks, a value of the wrong type or range, all become one line naming the key.
"""

from __future__ import annotations

import difflib
from collections.abc import Sequence
from importlib import resources
from pathlib import Path

from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.errors import HydraException
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from lightning_mp.cli.checks import UsageError, validate

DEFAULT_RECIPE = "tiny"
GROUPS = ("precision", "model", "data", "optimizer", "trainer", "logger", "callbacks")


def recipe_dir() -> Path:
    """The installed ``recipes/`` folder (inside the package in a wheel, the repository's in an editable install)."""
    return Path(str(resources.files("lightning_mp.recipe")))


def conf_dir() -> Path:
    return Path(str(resources.files("lightning_mp.conf")))


def recipes() -> list[str]:
    """The installed recipe names (``recipes/*.yaml``)."""
    return sorted(p.stem for p in recipe_dir().glob("*.yaml"))


def options(group: str) -> list[str]:
    """The options of a config group (``conf/<group>/*.yaml``)."""
    return sorted(p.stem for p in (conf_dir() / group).glob("*.yaml"))


def compose_recipe(name: str, overrides: Sequence[str] = ()) -> DictConfig:
    """A recipe's config with overrides, without running it (Hydra's compose API)."""
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(str(recipe_dir()), version_base="1.3"):
        return compose(name, overrides=[*overrides, "hydra.searchpath=[pkg://lightning_mp.conf]"])


_PARSER = OverridesParser.create()


def _parses(override: str) -> bool:
    try:
        _PARSER.parse_override(override)
        return True
    except HydraException:
        return False


def quote(override: str) -> str:
    """``key=value`` with the value quoted where Hydra's grammar cannot read it as it is."""
    if "=" not in override or _parses(override):
        return override
    key, value = override.split("=", 1)
    quoted = "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"
    return f"{key}={quoted}" if _parses(f"{key}={quoted}") else override


def hydra_argv(argv: list[str]) -> list[str]:
    """Turn ``recipe=<name>`` into Hydra's ``--config-name`` and quote the values Hydra could not read."""
    names = recipes()
    recipe, flags, rest = DEFAULT_RECIPE, [], []
    i = 0
    while i < len(argv):
        arg, i = argv[i], i + 1
        if arg.lstrip("+").startswith("recipe="):
            recipe = arg.split("=", 1)[1]
        elif arg.startswith("-"):  # Hydra's flags go first: its parser takes no override after a flag
            flags.append(arg)
            if i < len(argv) and (arg in _TAKES_A_VALUE or (arg == "--info" and argv[i] in _INFO_TOPICS)):
                flags.append(argv[i])
                i += 1
        else:
            key = arg.split("=", 1)[0].lstrip("+~")
            if key == "trainer.precision":
                raise UsageError(f"{arg}: choose the precision with precision=<name> ({', '.join(options('precision'))}), "
                                 "not trainer.precision")
            rest.append(quote(arg))
    if recipe not in names:
        raise UsageError(f"unknown recipe {recipe!r}; choose one of: {', '.join(names)}")
    return [f"--config-dir={recipe_dir()}", f"--config-name={recipe}", *flags, *rest]


_TAKES_A_VALUE = {"--cfg", "-c", "--package", "-p", "--experimental-rerun", "--config-path", "-cp", "--config-name",
                  "-cn", "--config-dir", "-cd"}
_INFO_TOPICS = {"all", "config", "defaults", "defaults-tree", "plugins", "searchpath"}


def preflight(argv: list[str]) -> None:
    """Compose the run's config as Hydra will (a sweep's first job; every option a sweep names is
    checked to exist) and check it: every mistake is a :class:`UsageError` before Hydra starts."""
    recipe = next(a.split("=", 1)[1] for a in argv if a.startswith("--config-name="))
    overrides = [a for a in argv if not a.startswith("-")]
    if any(a in ("--help", "-h", "--hydra-help", "--info", "--cfg", "-c", "--shell-completion") or a.startswith(
            ("--cfg=", "--info=", "--package", "-p")) for a in argv):
        return
    first = []
    for text in overrides:
        try:
            override = _PARSER.parse_override(text)
        except HydraException as err:
            raise UsageError(f"{text}: cannot be read as key=value ({str(err).strip().splitlines()[0]})") from err
        written = text.split("=", 1)[0]  # the key as given, with any +/++ prefix
        key = written.lstrip("+~")
        if key.startswith("hydra"):
            continue
        if override.is_delete() or not override.is_sweep_override():
            values = [] if override.is_delete() else [override.get_value_element_as_str()]
            first.append(text)
        else:
            values = list(override.sweep_string_iterator())
            first.append(quote(f"{written}={values[0]}"))
        if key in GROUPS:
            for value in values:
                if value not in options(key):
                    close = difflib.get_close_matches(value, options(key), n=1)
                    hint = f" (did you mean {close[0]}?)" if close else ""
                    raise UsageError(f"{key}={value}: no such option{hint}; choose one of: {', '.join(options(key))}")
    base = compose_recipe(recipe)
    try:
        cfg = compose_recipe(recipe, first)
    except (HydraException, OmegaConfBaseException) as err:
        raise UsageError(_composition_error(err, base)) from err
    validate(cfg, base)


def _composition_error(err: Exception, base: DictConfig) -> str:
    """One line for Hydra's multi-line composition errors."""
    text = str(err)
    cause = err.__cause__ if err.__cause__ is not None else err
    full_key = getattr(cause, "full_key", None)
    if "is not in struct" in str(cause) and full_key:
        parent, _, leaf = str(full_key).rpartition(".")
        node = OmegaConf.select(base, parent) if parent else base
        keys = [str(k) for k in node.keys()] if isinstance(node, DictConfig) else []
        close = difflib.get_close_matches(leaf, keys, n=1)
        hint = f"did you mean {parent + '.' if parent else ''}{close[0]}? " if close else ""
        return f"{full_key}: no such key ({hint}+{full_key}=<value> adds a new one)"
    if "Multiple values for" in text:
        return text.strip().splitlines()[0] + " (give each key once)"
    return text.strip().splitlines()[0]
