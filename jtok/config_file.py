"""Reading a config or spec file (YAML or JSON) into a mapping, with one-line errors."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from jtok.config import ConfigError


def _unique_key_loader():
    """PyYAML's safe loader, refusing a key given twice in one mapping: plain YAML keeps the
    last and drops the first without a word (a sweep axis value renamed onto another's name
    would silently train the wrong model under its name)."""
    import yaml

    class UniqueKeyLoader(yaml.SafeLoader):
        def construct_mapping(self, node, deep=False):
            if isinstance(node, yaml.MappingNode):
                seen = set()
                for key_node, _ in node.value:
                    if key_node.tag == "tag:yaml.org,2002:merge":  # "<<" merges may override
                        continue
                    key = self.construct_object(key_node, deep=deep)
                    try:
                        duplicate = key in seen
                        seen.add(key)
                    except TypeError:  # unhashable: the base class reports it
                        continue
                    if duplicate:
                        raise yaml.constructor.ConstructorError(
                            "while constructing a mapping", node.start_mark,
                            f"found duplicate key {key!r}", key_node.start_mark)  # fmt: skip
            return super().construct_mapping(node, deep=deep)

    return UniqueKeyLoader


def load_mapping(path, what: str = "config") -> dict[str, Any]:
    """A YAML or JSON file (YAML reads both) that must hold a mapping.

    Every failure is a one-line ConfigError naming the file: missing, a folder, binary or
    not UTF-8, empty, a syntax error (``config my.yaml:3:7: mapping values are not
    allowed here``), a key given twice in one mapping, or content that is not a mapping."""
    import yaml

    try:
        raw = Path(path).read_bytes()
    except OSError as err:
        raise ConfigError(f"cannot read {what} {path}: {err.strerror}") from None
    if b"\0" in raw:
        raise ConfigError(f"{what} {path} is a binary file, not YAML/JSON text")
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        byte = raw[err.start]
        raise ConfigError(f"{what} {path}: byte offset {err.start} (0x{byte:02x}) is not "
                          "valid UTF-8") from None  # fmt: skip
    try:
        data = yaml.load(text, Loader=_unique_key_loader())  # noqa: S506 (a SafeLoader)
    except yaml.MarkedYAMLError as err:
        mark = err.problem_mark or err.context_mark
        where = f":{mark.line + 1}:{mark.column + 1}" if mark else ""
        problem = " ".join(str(err.problem or err.context).split())
        context = f" ({' '.join(err.context.split())})" if err.problem and err.context else ""
        raise ConfigError(f"{what} {path}{where}: {problem}{context}") from None
    except yaml.reader.ReaderError as err:
        line = text.count("\n", 0, err.position) + 1
        column = err.position - (text.rfind("\n", 0, err.position) + 1) + 1
        raise ConfigError(f"{what} {path}:{line}:{column}: unacceptable character "
                          f"#x{err.character:04x} ({err.reason})") from None  # fmt: skip
    except (yaml.YAMLError, RecursionError) as err:
        message = " ".join(str(err).split()) or "nested too deeply"
        raise ConfigError(f"{what} {path} is not valid YAML/JSON: {message}") from None
    if data is None:
        raise ConfigError(f"{what} {path} is empty")
    if not isinstance(data, dict):
        kind = {list: "a list", str: "a string", bool: "true/false"}.get(type(data), "a number")
        raise ConfigError(f"{what} {path} must hold a mapping (key: value), not {kind}")
    return data
