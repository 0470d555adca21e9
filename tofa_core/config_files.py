"""Reading the project's YAML files (a config with `ingest:` and `train:` sections, a targets
file) as untrusted input: a bounded read of one regular UTF-8 file, no aliases (the "billion
laughs" expansion needs them), no duplicate keys, no unknown sections, and every error a
ValueError that names the file and never echoes more than a line of it."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import yaml
from pydantic import ValidationError

# A config or targets file is a page of YAML; anything larger is a mistake or an attack.
MAX_BYTES = 1 << 20
SECTIONS = ("ingest", "train")
SHOWN = 120  # characters of a bad value or parser message an error repeats


class ConfigError(ValueError):
    """A config or targets file cannot be used; the message names the file and the fix."""


def short(text: str) -> str:
    return text if len(text) <= SHOWN else text[: SHOWN - 3] + "..."


class _StrictLoader(yaml.SafeLoader):
    """SafeLoader without aliases and without silently repeated keys."""

    def compose_node(self, parent, index):
        if self.check_event(yaml.AliasEvent):
            mark = self.peek_event().start_mark
            raise yaml.composer.ComposerError(
                None, None, "aliases (*name) are not allowed: write the value out", mark
            )
        return super().compose_node(parent, index)

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            if not isinstance(key, (str, int, float, bool)):
                continue  # a composite key: the schema refuses it later
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {short(repr(key))}", key_node.start_mark
                )
            seen.add(key)
        return super().construct_mapping(node, deep)


def _read_text(path: Path, what: str) -> str:
    try:
        with open(path, "rb") as f:  # a link loop fails here (ELOOP), a folder below
            if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):
                raise ConfigError(f"{what} {path} is not a file (a folder or a device); give a .yaml file")
            data = f.read(MAX_BYTES + 1)
    except FileNotFoundError:
        raise ConfigError(f"{what} {path} does not exist") from None
    except IsADirectoryError:
        raise ConfigError(f"{what} {path} is a folder; give a .yaml file") from None
    except OSError as err:
        raise ConfigError(f"cannot read {what} {path}: {err.strerror}") from None
    if len(data) > MAX_BYTES:
        raise ConfigError(f"{what} {path} is over {MAX_BYTES} bytes; a {what} is a page of YAML")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as err:
        raise ConfigError(f"{what} {path} is not UTF-8 text (byte {err.start})") from None


def read_yaml(path: str | Path, what: str = "config file") -> object:
    """The parsed YAML of one file, or a ConfigError naming it."""
    return parse_yaml(read_text(path, what), path)


def read_text(path: str | Path, what: str = "config file") -> str:
    """One small UTF-8 file's text (a regular file, at most MAX_BYTES), or a ConfigError."""
    return _read_text(Path(path), what)


def parse_yaml(text: str, path: str | Path) -> object:
    """The YAML in `text` (read from `path`), or a ConfigError naming `path`."""
    try:
        loader = _StrictLoader(text)  # a SafeLoader: nothing but plain YAML types is built
        try:
            return loader.get_single_data()
        finally:
            loader.dispose()
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML ({short(str(err))})") from None


def load_sections(path: str | Path) -> dict[str, dict]:
    """Every section of a config file, read once ({} for an absent one); unknown sections are refused."""
    data = read_yaml(path) or {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a config file is a YAML mapping with sections such as '{SECTIONS[-1]}:'")
    unknown = sorted(str(k) for k in data if k not in SECTIONS)
    if unknown:
        raise ConfigError(
            f"{path}: unknown section(s) {short(repr(unknown))}; a config file has {', '.join(SECTIONS)}"
        )
    for section in SECTIONS:
        if not isinstance(data.get(section) or {}, dict):
            raise ConfigError(f"{path}: '{section}' must be a mapping, got {short(repr(data[section]))}")
    return {section: data.get(section) or {} for section in SECTIONS}


def load_section(path: str | Path, section: str) -> dict:
    """One section of a config file ({} when absent); unknown sections are refused."""
    return load_sections(path)[section]


def load_section_model(model, path: str | Path, section: str, **overrides):
    """Build pydantic `model` from a config file's `section`; errors name file, field and value."""
    return section_model(model, load_section(path, section), path, section, **overrides)


def section_model(model, values: dict, path: str | Path, section: str, **overrides):
    """Build pydantic `model` from `values`, the `section` of config file `path` (already read)."""
    data = {**values, **overrides}
    if bad := [k for k in data if not isinstance(k, str)]:  # YAML keys may be numbers, null, lists
        raise ConfigError(f"{path}: {section}: setting names are words, got {short(repr(bad[0]))}")
    try:
        return model(**data)
    except ValidationError as err:
        first = err.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        raise ConfigError(
            f"{path}: {section}.{where}: {first['msg']} (got {short(repr(first.get('input')))})"
        ) from None
