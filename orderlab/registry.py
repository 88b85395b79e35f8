"""Registry of components by kind and name, and building them from config.

Components (processes, policies, objectives, tasks, attention rules, models) register
themselves with a decorator when their package is imported::

    @register("policy", "eb")
    class EntropyBounded(Policy): ...

``build(kind, spec, **kwargs)`` turns a name, a dotted path or a config mapping into an
instance. The keys of a mapping are the constructor's arguments, checked against its
signature *before* anything is built: an unknown key, a missing argument or a value of
the wrong type raises :class:`ConfigError` naming the key path and, for a typo, the
nearest valid key. (The torchtune / fairseq style: config keys are constructor arguments.)

Spec forms accepted everywhere::

    "eb"                                  # registered name
    "mypkg.mymod.MyPolicy"                # dotted path to a class or factory
    {"name": "eb", "gamma": 0.1}          # registered name + arguments
    {"_target_": "mymod.MyPolicy", "k": 2}

A nested mapping with ``name``/``_target_`` is built recursively when the argument is
annotated with the base class of a registered kind (e.g. a ``Process`` argument).
"""

from __future__ import annotations

import difflib
import importlib
import inspect
import types
import typing
from collections.abc import Callable, Mapping
from typing import Any

__all__ = ["ConfigError", "register", "register_kind", "lookup", "build", "check", "check_spec", "split", "names"]


class ConfigError(ValueError):
    """A configuration is wrong. ``path`` is the dotted key path of the offending key."""

    def __init__(self, path: str, message: str):
        self.path = path
        super().__init__(f"{path}: {message}" if path else message)


# kind -> (module whose import registers it, "module:Class" of its base class or None).
# Bases are named, not imported, so this floor-1 module imports no component.
_KINDS: dict[str, tuple[str, str | None]] = {
    "process": ("orderlab.processes", "orderlab.processes.base:Process"),
    "policy": ("orderlab.policies", "orderlab.policies.base:Policy"),
    "policy_net": ("orderlab.policies", "orderlab.policies.learned:PolicyNet"),
    "objective": ("orderlab.objectives", "orderlab.objectives.base:Objective"),
    "reward": ("orderlab.objectives", "orderlab.objectives.rewards:Reward"),
    "task": ("orderlab.tasks", "orderlab.tasks.base:Task"),
    "attention": ("orderlab.rules", "orderlab.rules:AttentionRule"),
    "model": ("orderlab.model", None),
}
_REGISTRY: dict[str, dict[str, Callable[..., Any]]] = {}


def register_kind(kind: str, module: str, base: str | None = None) -> None:
    """Declare a kind, the module whose import fills it, and its base class as "module:Class"."""
    _KINDS[kind] = (module, base)


def _base(kind: str) -> type | None:
    """The base class of a kind, if its module is importable (None otherwise)."""
    ref = _KINDS[kind][1]
    if ref is None:
        return None
    module, _, attr = ref.partition(":")
    try:
        return getattr(importlib.import_module(module), attr, None)
    except ImportError:
        return None


def register(kind: str, name: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Decorator: register a class (or factory function) under ``kind``/``name``.

    Registering a second, different object under the same name is an error.
    """

    def deco(obj: Callable[..., Any]) -> Callable[..., Any]:
        table = _REGISTRY.setdefault(kind, {})
        old = table.get(name)
        if old is not None and old is not obj and _qualname(old) != _qualname(obj):
            raise ValueError(
                f"{kind} {name!r} is already registered as {_qualname(old)}; "
                f"cannot register {_qualname(obj)} under the same name"
            )
        table[name] = obj
        return obj

    return deco


def _qualname(obj: Any) -> str:
    return f"{getattr(obj, '__module__', '?')}.{getattr(obj, '__qualname__', repr(obj))}"


def _ensure_loaded(kind: str) -> None:
    if kind in _KINDS:
        importlib.import_module(_KINDS[kind][0])


def names(kind: str) -> list[str]:
    """All registered names of a kind (imports the kind's package first)."""
    _ensure_loaded(kind)
    return sorted(_REGISTRY.get(kind, {}))


def _import_dotted(path: str, where: str) -> Callable[..., Any]:
    module, _, attr = path.rpartition(".")
    if not module:
        raise ConfigError(where, f"{path!r} is not a dotted path 'module.Name'")
    try:
        mod = importlib.import_module(module)
    except ImportError as e:
        raise ConfigError(where, f"cannot import module {module!r} for {path!r}: {e}") from e
    try:
        return getattr(mod, attr)
    except AttributeError:
        raise ConfigError(where, f"module {module!r} has no attribute {attr!r}") from None


def lookup(kind: str, name: str, path: str = "") -> Callable[..., Any]:
    """The class registered as ``kind``/``name``, or the object at a dotted path."""
    if kind not in _KINDS and kind not in _REGISTRY:
        raise ConfigError(path, f"unknown component kind {kind!r}; kinds: {sorted(_KINDS)}")
    _ensure_loaded(kind)
    table = _REGISTRY.get(kind, {})
    if name in table:
        return table[name]
    if "." in name:
        return _import_dotted(name, path)
    close = difflib.get_close_matches(name, list(table), n=1)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    raise ConfigError(path, f"unknown {kind} {name!r}{hint} (registered: {', '.join(sorted(table))})")


def _as_dict(spec: Any) -> dict[str, Any] | None:
    if isinstance(spec, Mapping):
        return dict(spec)
    try:  # omegaconf DictConfig without importing omegaconf at floor 1
        from omegaconf import DictConfig, OmegaConf

        if isinstance(spec, DictConfig):
            return OmegaConf.to_container(spec, resolve=True)  # type: ignore[return-value]
    except ImportError:  # pragma: no cover
        pass
    return None


def _split_spec(kind: str, spec: Any, path: str) -> tuple[Callable[..., Any], dict[str, Any]]:
    if isinstance(spec, str):
        return lookup(kind, spec, path), {}
    d = _as_dict(spec)
    if d is None:
        raise ConfigError(path, f"expected a {kind} name or a mapping with 'name'/'_target_', got {type(spec).__name__}")
    target = d.pop("_target_", None)
    name = d.pop("name", None)
    if target is None and name is None:
        raise ConfigError(path, f"a {kind} mapping needs a 'name' (registered {kind}) or '_target_' (dotted path) key")
    if target is not None and name is not None:
        raise ConfigError(path, "give either 'name' or '_target_', not both")
    key = "_target_" if target is not None else "name"
    cls = lookup(kind, str(target if target is not None else name), f"{path}.{key}" if path else key)
    return cls, d


def split(kind: str, spec: Any, path: str = "") -> tuple[Callable[..., Any], dict[str, Any]]:
    """``(class, arguments)`` of a name / dotted path / mapping spec, nothing built."""
    return _split_spec(kind, spec, path or kind)


def check_spec(kind: str, spec: Any, path: str = "", **inject: Any) -> Callable[..., Any]:
    """Check a spec and its nested component specs recursively, building nothing.

    ``inject`` holds arguments the builder will add (placeholders: only the key names
    and scalar types are checked). Returns the component's class.
    """
    path = path or kind
    if not isinstance(spec, str) and _as_dict(spec) is None:
        raise ConfigError(path, f"expected a {kind} name or a mapping with 'name'/'_target_', got {type(spec).__name__}")
    cls, args = _split_spec(kind, spec, path)
    args.update(inject)
    check(cls, args, path)
    hints = _hints(cls)
    for key, value in args.items():
        sub = _kind_of_annotation(hints[key]) if key in hints else None
        if sub is not None and (_is_spec(value) or isinstance(value, str)):
            check_spec(sub, value, f"{path}.{key}")
    return cls


def _signature(cls: Callable[..., Any]) -> inspect.Signature:
    return inspect.signature(cls)


def _hints(cls: Callable[..., Any]) -> dict[str, Any]:
    fn = cls.__init__ if inspect.isclass(cls) else cls
    try:
        return typing.get_type_hints(fn)
    except Exception:  # unresolved forward references: no type checks, never a crash
        return {}


def _kind_of_annotation(ann: Any) -> str | None:
    for t in _flatten_union(ann):
        if not inspect.isclass(t):
            continue
        for kind in list(_KINDS):
            base = _base(kind)
            if base is not None and issubclass(t, base):
                return kind
    return None


def _flatten_union(ann: Any) -> list[Any]:
    origin = typing.get_origin(ann)
    if origin is typing.Union or origin is types.UnionType:
        return [a for arg in typing.get_args(ann) for a in _flatten_union(arg)]
    return [ann]


_SIMPLE = (bool, int, float, str)


def _check_type(value: Any, ann: Any, path: str) -> None:
    """Check plain scalar annotations (int, float, bool, str, Optional of those)."""
    options = _flatten_union(ann)
    if any(o is Any or o is typing.Any for o in options):
        return
    simple = [o for o in options if o in _SIMPLE or o is type(None)]
    if len(simple) != len(options):  # a richer annotation: do not guess
        return
    if value is None:
        if type(None) in simple:
            return
        raise ConfigError(path, f"must be {_ann_name(ann)}, got null")
    for o in simple:
        if o is float and isinstance(value, (int, float)) and not isinstance(value, bool):
            return
        if o is int and isinstance(value, int) and not isinstance(value, bool):
            return
        if o in (bool, str) and isinstance(value, o):
            return
    raise ConfigError(path, f"must be {_ann_name(ann)}, got {type(value).__name__} {value!r}")


def _ann_name(ann: Any) -> str:
    return " or ".join(getattr(o, "__name__", str(o)) for o in _flatten_union(ann))


def check(cls: Callable[..., Any], kwargs: Mapping[str, Any], path: str = "") -> None:
    """Check ``kwargs`` against the signature of ``cls`` without calling it."""
    sig = _signature(cls)
    params = {n: p for n, p in sig.parameters.items() if n != "self"}
    var_kw = any(p.kind is p.VAR_KEYWORD for p in params.values())
    named = {n: p for n, p in params.items() if p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)}
    hints = _hints(cls)
    where = lambda k: f"{path}.{k}" if path else k  # noqa: E731
    for key in kwargs:
        if key not in named and not var_kw:
            close = difflib.get_close_matches(key, list(named), n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            valid = ", ".join(named) or "(none)"
            raise ConfigError(where(key), f"unknown key for {cls.__name__}{hint} (valid keys: {valid})")
    for n, p in named.items():
        if p.default is p.empty and n not in kwargs:
            raise ConfigError(where(n), f"missing required argument of {cls.__name__}")
    for key, value in kwargs.items():
        if key in hints and not _is_spec(value):
            _check_type(value, hints[key], where(key))


def _is_spec(value: Any) -> bool:
    d = _as_dict(value)
    return d is not None and ("name" in d or "_target_" in d)


def build(kind: str, spec: Any, path: str | None = None, **kwargs: Any) -> Any:
    """Build a component of ``kind`` from a name, dotted path, mapping or instance.

    ``kwargs`` are added to (and override) the keys of the spec. An object that is
    already built (not a str or mapping) is returned unchanged when no kwargs are given.
    """
    path = kind if path is None else path
    if not isinstance(spec, str) and _as_dict(spec) is None:
        if kwargs:
            raise ConfigError(path, f"cannot add arguments {sorted(kwargs)} to an already built {kind}")
        return spec
    cls, args = _split_spec(kind, spec, path)
    args.update(kwargs)
    check(cls, args, path)
    hints = _hints(cls)
    for key, value in list(args.items()):
        sub_kind = _kind_of_annotation(hints[key]) if key in hints else None
        if sub_kind is not None and _is_spec(value):
            args[key] = build(sub_kind, value, path=f"{path}.{key}")
    try:
        return cls(**args)
    except ConfigError:
        raise
    except (TypeError, ValueError) as e:
        raise ConfigError(path, f"{cls.__name__}: {e}") from e
