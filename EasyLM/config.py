"""Nested configuration dictionaries with declared defaults and dotted-key updates.

Every component of the toolkit declares its defaults next to its code as
``get_default_config(updates=None) -> ConfigDict``, each key with its meaning:
``seed=Option(42, "parameter initialisation ...")``; the runner's ``--help`` is generated from
these declarations.  A ``ConfigDict`` is an attribute dictionary that refuses unknown keys, so
a misspelt config key fails at once with the closest valid names instead of being silently
ignored.  It has no dependency beyond the standard library, so the same code runs on machines
without ``ml_collections``.
"""
import ast
import copy
import dataclasses
import difflib
import json
import operator


class ConfigError(ValueError):
    """A configuration value or key that cannot work; the message names the key."""


@dataclasses.dataclass(frozen=True)
class Option:
    """A declared default and what the key means (shown by ``--help``)."""
    default: object
    help: str


class JsonObject(dict):
    """A value that is a JSON object of free keys (a model's field overrides), where a plain
    dict would be a group of declared keys.  A config file or the command line gives it as an
    object or as the string of one, read once (:func:`parse_object`) when the key is set."""


class ConfigDict(dict):
    """A dict with attribute access whose set of keys is fixed by its defaults.

    Values may be declared as :class:`Option`; the dict holds the default and keeps the meaning
    aside (``describe``).  A ``ConfigDict`` passed positionally brings its meanings (and
    sources) along.  ``update_from`` notes which source set each key, so that a value of the
    wrong type is refused saying where the value it replaces came from."""

    def __init__(self, *args, **kwargs):
        super().__init__()
        object.__setattr__(self, "_help", {})
        object.__setattr__(self, "_sources", {})  # key -> the update_from source that set it
        for source in args:
            if isinstance(source, ConfigDict):
                self._help.update(source._help)
                self._sources.update(source._sources)
        for key, value in dict(*args, **kwargs).items():
            if isinstance(value, Option):
                self._help[key] = value.help
                value = value.default
            dict.__setitem__(self, key, _wrap(value))

    def __getattr__(self, name):
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None

    def __setattr__(self, name, value):
        if name not in self:
            raise ConfigError(unknown_key_message(name, self.keys()))
        self[name] = _wrap(value)

    def __deepcopy__(self, memo):
        copied = ConfigDict({k: copy.deepcopy(v, memo) for k, v in self.items()})
        copied._help.update(self._help)
        copied._sources.update(self._sources)
        return copied

    def copy_and_update(self, updates=None, prefix=""):
        config = copy.deepcopy(self)
        if updates:
            config.update_from(updates, prefix)
        return config

    def update_from(self, updates, prefix="", source="an earlier update"):
        """Apply nested or dotted updates; unknown keys raise ``ConfigError``.  ``source``
        (e.g. ``"the command line"``) names these updates in later type errors."""
        if isinstance(updates, str):
            updates = json.loads(updates)
        for key, value in dict(updates).items():
            head, _, rest = key.partition(".")
            full = f"{prefix}{head}"
            if head not in self:
                raise ConfigError(unknown_key_message(full, self.keys(), prefix))
            current = self[head]
            if rest:
                if not isinstance(current, ConfigDict):
                    raise ConfigError(f"config key '{full}' is a value, not a group; "
                                      f"'{full}.{rest}' does not exist")
                current.update_from({rest: value}, full + ".", source)
            elif isinstance(current, ConfigDict) and isinstance(value, dict):
                current.update_from(value, full + ".", source)
            else:
                self[head] = coerce_like(current, value, full, self._sources.get(head))
                self._sources[head] = source
        return self

    def _leaves(self, prefix=""):
        """``(dotted key, owning ConfigDict, key)`` for every leaf."""
        for key, value in self.items():
            if isinstance(value, ConfigDict):
                yield from value._leaves(f"{prefix}{key}.")
            else:
                yield f"{prefix}{key}", self, key

    def flatten(self, prefix=""):
        """``{'a.b': value}`` for every leaf."""
        return {path: owner[key] for path, owner, key in self._leaves(prefix)}

    def describe(self, prefix=""):
        """``{'a.b': meaning}`` for every leaf, ``""`` where none was declared."""
        return {path: owner._help.get(key, "") for path, owner, key in self._leaves(prefix)}

    def to_dict(self):
        return {k: v.to_dict() if isinstance(v, ConfigDict) else v for k, v in self.items()}


def _wrap(value):
    if isinstance(value, dict) and not isinstance(value, (ConfigDict, JsonObject)):
        return ConfigDict(value)
    return value


def unknown_key_message(key, valid, prefix=""):
    valid = [f"{prefix}{k}" for k in valid]
    close = difflib.get_close_matches(key, valid, n=3, cutoff=0.5)
    hint = f" Did you mean: {', '.join(close)}?" if close else ""
    return f"unknown config key '{key}'.{hint}"


def coerce_like(current, value, key, source=None):
    """Convert a command-line or JSON value to the type of the key's ``current`` value: its
    declared default, or what ``source`` set it to."""
    if current is None or value is None:
        return value
    if isinstance(current, JsonObject):
        return JsonObject(parse_object(value, key))
    try:
        if isinstance(current, bool):
            if isinstance(value, str):
                lowered = value.strip().lower()
                if lowered in ("1", "true", "yes", "on"):
                    return True
                if lowered in ("0", "false", "no", "off"):
                    return False
                raise ValueError(value)
            return bool(value)
        if isinstance(current, int) and not isinstance(value, bool):
            if isinstance(value, float) and not value.is_integer():
                raise ValueError(value)
            return int(value)
        if isinstance(current, float):
            return float(value)
        if isinstance(current, str):
            return value if isinstance(value, str) else json.dumps(value)
    except (TypeError, ValueError):
        given = f"default {current!r}" if source is None else f"{source} gives {current!r}"
        raise ConfigError(f"config key '{key}': cannot use {value!r} where a "
                          f"{type(current).__name__} is expected ({given})") from None
    return value


def parse_object(text, key):
    """A dict from a flag's string: ``'{"a": 1}'``, ``"{'a': 1}"`` or ``"dict(a=1)"`` (the
    original EasyLM configs' form); ``{}`` for an empty string; a dict as it is."""
    if isinstance(text, dict):
        return dict(text)
    if not text:
        return {}
    if not isinstance(text, str):
        raise ConfigError(f"{key}={text!r}: expected a JSON object")
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        try:
            node = ast.parse(text, mode="eval").body
            if (isinstance(node, ast.Call) and getattr(node.func, "id", None) == "dict"
                    and not node.args):
                value = {kw.arg: ast.literal_eval(kw.value) for kw in node.keywords}
            else:
                value = ast.literal_eval(node)
        except (SyntaxError, ValueError):
            raise ConfigError(f"{key}={text!r}: expected a JSON object such as "
                              f'{{"vocab_size": 32000}}') from None
    if not isinstance(value, dict):
        raise ConfigError(f"{key}={text!r}: expected a JSON object")
    return value


_COMPARISONS = {">=": operator.ge, ">": operator.gt, "<=": operator.le, "<": operator.lt}


def check_ranges(config, prefix="", **rules):
    """Raise ``ConfigError`` naming the first key outside its range.

    A rule is a comparison such as ``"> 0"`` or a tuple of them: ``b1=(">= 0", "< 1")``."""
    for key, rule in rules.items():
        comparisons = (rule,) if isinstance(rule, str) else rule
        for comparison in comparisons:
            op, bound = comparison.split()
            if not _COMPARISONS[op](config[key], float(bound)):
                raise ConfigError(f"{prefix}{key}={config[key]!r} must be "
                                  f"{' and '.join(comparisons)}")
