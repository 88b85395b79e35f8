"""Registry of components by kind and name, and the one walk that checks and builds them.

Kinds are declared by the base class of each, in its own module (the registry names no
module above it)::

    @declare_kind("policy")
    class Policy: ...

    @register("policy", "eb")
    class EntropyBounded(Policy): ...

Spec forms accepted for any component::

    "eb"                                  # registered name
    "mypkg.mymod.MyPolicy"                # dotted path to a class or factory
    {"name": "eb", "gamma": 0.1}          # registered name + arguments
    {"_target_": "mymod.MyPolicy", "k": 2}

**One walk** (:func:`build`, and :func:`check`, which is the same walk building nothing)
visits every node of a spec: a mapping with ``name`` / ``_target_`` anywhere (an
argument, a list element, a mapping value) is a component, whatever its annotation. Its
kind comes from the annotation of the argument that holds it (``Process``,
``list[Process]``, ``PolicyNet | None``); a ``_target_`` node needs no kind; a ``name``
node whose kind no annotation gives is an error. A bare string is a registered name
where the annotation is a kind's base class (and does not also admit ``str``). A mapping
under an argument annotated with a dataclass is that dataclass's keys (a settings
section). The keys of every node are the constructor's arguments, checked against its
signature before anything is built: an unknown key, a missing argument or a scalar of
the wrong type raises :class:`ConfigError` naming the full key path and, for a typo,
the nearest valid key. Constructors get built objects. (torchtune's
``_instantiate_node`` and ``_validate``.)

**Runtime values** (the task, vocabulary size, sequence length, token frequencies, the
width of a policy's features) are not in the YAML. A class declares the constructor
arguments it takes from the build's :class:`Context` in ``needs``; a class whose children
need a value it alone knows declares it in ``provides`` (a function of its own bound
arguments, evaluated only when a child asks)::

    class PolicyNet(nn.Module):
        needs = ("in_features",)

    class LearnedPolicy(Policy):
        provides = {"in_features": lambda args: Features(args["features"]).size}

A needed argument without a default is the experiment's (a spec that sets it is an
error naming where the value comes from); one with a default may be set in the spec
and is filled from the context otherwise (``pc_sampler``'s ``token_freqs``). A constructor
that raises :class:`ConfigError` names the key relative to its own node (``"group"``);
the walk prefixes the node's path. Any other ``TypeError`` / ``ValueError`` it raises is
reported as a :class:`ConfigError` at the node's path.
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib
import inspect
import types
import typing
from collections import ChainMap
from collections.abc import Callable, Mapping, Sequence
from typing import Any

__all__ = [
    "ConfigError",
    "Context",
    "declare_kind",
    "register",
    "lookup",
    "names",
    "kinds",
    "split",
    "build",
    "check",
    "check_args",
    "build_settings",
    "DEFERRED",
    "is_spec",
]


class ConfigError(ValueError):
    """A configuration is wrong. ``path`` is the dotted key path of the offending key."""

    def __init__(self, path: str, message: str):
        self.path, self.message = path, message
        super().__init__(f"{path}: {message}" if path else message)


_KINDS: dict[str, type] = {}  # kind -> base class, declared by the base's own module
_REGISTRY: dict[str, dict[str, Callable[..., Any]]] = {}


def declare_kind(kind: str) -> Callable[[type], type]:
    """Class decorator for a base class: its subclasses are components of ``kind``."""

    def deco(base: type) -> type:
        old = _KINDS.get(kind)
        if old is not None and _qualname(old) != _qualname(base):
            raise ValueError(f"kind {kind!r} is already declared by {_qualname(old)}")
        _KINDS[kind] = base
        _REGISTRY.setdefault(kind, {})
        return base

    return deco


def register(kind: str, name: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Decorator: register a class (or factory function) under ``kind``/``name``.

    The kind must be declared (its base module imported); a second, different object
    under the same name is an error.
    """

    def deco(obj: Callable[..., Any]) -> Callable[..., Any]:
        if kind not in _KINDS:
            raise ValueError(f"cannot register {_qualname(obj)} as {kind!r}: no such kind (declared: {sorted(_KINDS)})")
        table = _REGISTRY[kind]
        old = table.get(name)
        if old is not None and old is not obj and _qualname(old) != _qualname(obj):
            raise ValueError(f"{kind} {name!r} is already registered as {_qualname(old)}; "
                             f"cannot register {_qualname(obj)} under the same name")
        table[name] = obj
        return obj

    return deco


def _qualname(obj: Any) -> str:
    return f"{getattr(obj, '__module__', '?')}.{getattr(obj, '__qualname__', repr(obj))}"


def kinds() -> list[str]:
    return sorted(_KINDS)


def names(kind: str) -> list[str]:
    """All registered names of a kind."""
    _known(kind, "")
    return sorted(_REGISTRY[kind])


def _known(kind: str, path: str) -> None:
    if kind not in _KINDS:
        raise ConfigError(path, f"unknown component kind {kind!r}; kinds: {sorted(_KINDS)}")


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
    _known(kind, path)
    table = _REGISTRY[kind]
    if name in table:
        return table[name]
    if "." in name:
        obj = _import_dotted(name, path)
        base = _KINDS[kind]
        if inspect.isclass(obj) and not issubclass(obj, base):
            raise ConfigError(path, f"{name!r} is not a {kind} (a subclass of {base.__name__})")
        return obj
    close = difflib.get_close_matches(name, list(table), n=1)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    raise ConfigError(path, f"unknown {kind} {name!r}{hint} (registered: {', '.join(sorted(table))})")


# --------------------------------------------------------------------------- specs


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


def is_spec(value: Any) -> bool:
    """A mapping with ``name`` or ``_target_``: a component node."""
    d = _as_dict(value)
    return d is not None and ("name" in d or "_target_" in d)


def split(kind: str | None, spec: Any, path: str = "") -> tuple[Callable[..., Any], dict[str, Any]]:
    """``(class, arguments)`` of a name / dotted path / mapping spec, nothing built.
    ``kind`` None: only a ``_target_`` (or dotted path) can say what the node is."""
    if isinstance(spec, str):
        return (lookup(kind, spec, path) if kind is not None else _import_dotted(spec, path)), {}
    d = _as_dict(spec)
    if d is None:
        what = f"a {kind} name or " if kind else ""
        raise ConfigError(path, f"expected {what}a mapping with 'name'/'_target_', got {type(spec).__name__}")
    target, name = d.pop("_target_", None), d.pop("name", None)
    if target is None and name is None:
        raise ConfigError(path, f"a {kind or 'component'} mapping needs a 'name' (registered) or '_target_' "
                                "(dotted path) key")
    if target is not None and name is not None:
        raise ConfigError(path, "give either 'name' or '_target_', not both")
    key = _join(path, "_target_" if target is not None else "name")
    if callable(target):  # from Python: the class itself
        return target, d
    if target is not None:
        return (lookup(kind, str(target), key) if kind is not None else _import_dotted(str(target), key)), d
    if kind is None:
        raise ConfigError(path, f"cannot tell what kind of component {name!r} is: the argument holding it has no "
                                "component annotation (use '_target_', or annotate the argument with a base class)")
    return lookup(kind, str(name), key), d


# --------------------------------------------------------------------------- annotations


def _flatten_union(ann: Any) -> list[Any]:
    origin = typing.get_origin(ann)
    if origin is typing.Union or origin is types.UnionType:
        return [a for arg in typing.get_args(ann) for a in _flatten_union(arg)]
    return [ann]


def _kind_of(ann: Any) -> str | None:
    """The component kind an annotation names (its first option that subclasses a kind's base)."""
    for t in _flatten_union(ann):
        if inspect.isclass(t):
            for kind, base in _KINDS.items():
                if issubclass(t, base):
                    return kind
    return None


def _element(ann: Any) -> Any:
    """The element annotation of ``list[X]`` / ``Sequence[X]`` options (None otherwise)."""
    for t in _flatten_union(ann):
        args = typing.get_args(t)
        origin = typing.get_origin(t)
        if args and origin in (list, tuple, Sequence):
            return args[0]
    return None


def _dataclass_of(ann: Any) -> type | None:
    return next((t for t in _flatten_union(ann) if inspect.isclass(t) and dataclasses.is_dataclass(t)), None)


def _admits_str(ann: Any) -> bool:
    return any(t is str for t in _flatten_union(ann))


_SIMPLE = (bool, int, float, str)


def _ann_name(ann: Any) -> str:
    return " or ".join(getattr(o, "__name__", str(o)) for o in _flatten_union(ann))


def _check_type(value: Any, ann: Any, path: str) -> None:
    """Check plain scalar annotations (int, float, bool, str, Optional of those)."""
    options = _flatten_union(ann)
    if any(o is Any for o in options):
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


def _hints(cls: Callable[..., Any]) -> dict[str, Any]:
    fn = cls.__init__ if inspect.isclass(cls) else cls
    try:
        return typing.get_type_hints(fn)
    except Exception:  # unresolved forward references: no type checks, never a crash
        return {}


def _join(path: str, key: str) -> str:
    if not path:
        return key
    return f"{path}{key}" if key.startswith("[") else f"{path}.{key}"


# --------------------------------------------------------------------------- context


class _Deferred:
    """A runtime value that the check pass knows exists but does not compute."""

    def __repr__(self) -> str:
        return "<deferred>"


DEFERRED = _Deferred()


class Context:
    """The runtime values of a build: ``name -> value`` with where each comes from.

    A value may be a zero-argument callable marked lazy (:meth:`lazy`), computed once on
    first use (the task's token frequencies cost a pass over data). In the check pass
    values are :data:`DEFERRED`: only their presence is checked.
    """

    def __init__(self, values: Mapping[str, Any] | None = None, sources: Mapping[str, str] | None = None):
        self._values: dict[str, Any] = dict(values or {})
        self._lazy: dict[str, Callable[[], Any]] = {}
        self.sources: dict[str, str] = dict(sources or {})

    def set(self, name: str, value: Any, source: str = "") -> Context:
        self._values[name] = value
        self._lazy.pop(name, None)
        self.sources[name] = source or self.sources.get(name, "")
        return self

    def lazy(self, name: str, fn: Callable[[], Any], source: str = "") -> Context:
        self._values.pop(name, None)
        self._lazy[name] = fn
        self.sources[name] = source or self.sources.get(name, "")
        return self

    def __contains__(self, name: str) -> bool:
        return name in self._values or name in self._lazy

    def __getitem__(self, name: str) -> Any:
        if name not in self._values:
            self._values[name] = self._lazy.pop(name)()
        return self._values[name]

    def source(self, name: str) -> str:
        return self.sources.get(name) or "the experiment"

    def child(self, provides: Mapping[str, Callable[[Mapping[str, Any]], Any]], args: Mapping[str, Any],
              check_only: bool) -> Context:
        """This context plus what a parent ``provides`` to its children, computed from its
        bound ``args`` when a child asks (siblings bound earlier are built by then)."""
        if not provides:
            return self
        out = Context(self._values, self.sources)
        out._lazy.update(self._lazy)
        for name, fn in provides.items():
            if check_only:
                out.set(name, DEFERRED, "its parent component")
            else:
                out.lazy(name, lambda fn=fn: fn(args), "its parent component")
        return out

    def keys(self) -> list[str]:
        return sorted(set(self._values) | set(self._lazy))


def _needs(cls: Any) -> tuple[str, ...]:
    return tuple(getattr(cls, "needs", ()) or ())


def _provides(cls: Any) -> Mapping[str, Callable[[dict[str, Any]], Any]]:
    return getattr(cls, "provides", None) or {}


# --------------------------------------------------------------------------- the walk


def check_args(cls: Callable[..., Any], args: Mapping[str, Any], path: str = "", context: Context | None = None,
               given: Mapping[str, Any] | None = None) -> None:
    """Check ``args`` (a node's keys) against the signature of ``cls``, building nothing:
    unknown keys, missing arguments, scalar types, and the runtime arguments the class
    ``needs`` (present in ``context`` unless ``given`` by a Python caller)."""
    params = {n: p for n, p in inspect.signature(cls).parameters.items() if n != "self"}
    var_kw = any(p.kind is p.VAR_KEYWORD for p in params.values())
    named = {n: p for n, p in params.items() if p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)}
    needs = _needs(cls)
    given = given or {}
    context = context if context is not None else Context()
    for key in [*args, *given]:
        if key not in named and not var_kw:
            close = difflib.get_close_matches(key, [n for n in named if n not in needs], n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            valid = ", ".join(n for n in named if n not in needs) or "(none)"
            raise ConfigError(_join(path, key), f"unknown key for {cls.__name__}{hint} (valid keys: {valid})")
    for n in needs:
        required = n in named and named[n].default is named[n].empty
        if n in args and required:
            raise ConfigError(_join(path, n), f"is set by {context.source(n)}; remove this key")
        if n not in args and n not in given and n not in context and required:
            raise ConfigError(path, f"{cls.__name__} needs {n!r} at run time, which this build does not provide "
                                    f"(it provides: {', '.join(context.keys()) or 'nothing'})")
    for n, p in named.items():
        if p.default is p.empty and n not in args and n not in given and n not in needs:
            raise ConfigError(_join(path, n), f"missing required argument of {cls.__name__}")
    hints = _hints(cls)
    for key, value in args.items():
        if key in hints and not is_spec(value):
            _check_type(value, hints[key], _join(path, key))


def _value(ann: Any, value: Any, path: str, context: Context, check_only: bool) -> Any:
    """One argument's value, walked: components built (or checked), lists and mappings
    walked element by element, scalars checked against the annotation."""
    kind = _kind_of(ann) if ann is not None else None
    if is_spec(value):
        return _node(kind, value, path, context, check_only)
    if isinstance(value, str) and kind is not None and not _admits_str(ann):
        return _node(kind, value, path, context, check_only)
    d = _as_dict(value)
    if d is not None:
        settings = _dataclass_of(ann) if ann is not None else None
        if settings is not None:
            return _call(settings, d, path, context, check_only)
        return {k: _value(None, v, _join(path, str(k)), context, check_only) for k, v in d.items()}
    if isinstance(value, (list, tuple)) and not isinstance(value, str):
        elem = _element(ann) if ann is not None else None
        out = [_value(elem, v, _join(path, f"[{i}]"), context, check_only) for i, v in enumerate(value)]
        return type(value)(out) if isinstance(value, tuple) else out
    return value


def _holds_component(value: Any) -> bool:
    """Whether a value is, or holds, a component spec (or a bare string that may be one)."""
    if isinstance(value, str) or is_spec(value):
        return True
    d = _as_dict(value)
    if d is not None:
        return any(_holds_component(v) for v in d.values())
    return isinstance(value, (list, tuple)) and any(_holds_component(v) for v in value)


def _node(kind: str | None, spec: Any, path: str, context: Context, check_only: bool,
          given: Mapping[str, Any] | None = None) -> Any:
    if not isinstance(spec, str) and _as_dict(spec) is None:
        if given:
            raise ConfigError(path, f"cannot add arguments {sorted(given)} to an already built {kind or 'component'}")
        return type(spec) if check_only else spec
    cls, args = split(kind, spec, path)
    return _call(cls, args, path, context, check_only, given)


def _call(cls: Callable[..., Any], args: dict[str, Any], path: str, context: Context, check_only: bool,
          given: Mapping[str, Any] | None = None) -> Any:
    check_args(cls, args, path, context, given)
    hints, params = _hints(cls), inspect.signature(cls).parameters
    bound: dict[str, Any] = {}  # the arguments the constructor gets (the rest keep their defaults)
    defaults = {} if check_only else {n: p.default for n, p in params.items() if p.default is not p.empty}
    # runtime values the class needs and the spec does not set: what it provides sees them too
    needed = {} if check_only else {n: context[n] for n in _needs(cls)
                                    if n not in args and n not in (given or {}) and n in context}
    inner = context.child(_provides(cls), ChainMap(bound, needed, defaults), check_only)  # what it provides reads
    # plain values first, then components in signature order: what a parent provides to a
    # child is computed from its other arguments (and earlier siblings) as given
    order = {n: i for i, n in enumerate(params)}
    for key in sorted(args, key=lambda k: (_holds_component(args[k]), order.get(k, len(order)))):
        bound[key] = _value(hints.get(key), args[key], _join(path, key), inner, check_only)
    for key, value in (given or {}).items():  # a Python caller's arguments: walked too (names become components)
        bound[key] = _value(hints.get(key), value, _join(path, key), inner, check_only)
    if check_only:
        return cls
    for n, v in needed.items():
        bound.setdefault(n, v)
    try:
        return cls(**bound)
    except ConfigError as e:  # the constructor names a key of its own node
        raise ConfigError(_join(path, e.path), e.message) from None
    except (TypeError, ValueError) as e:
        raise ConfigError(path, f"{getattr(cls, '__name__', cls)}: {e}") from e


def build(kind: str | None, spec: Any, path: str | None = None, context: Context | Mapping[str, Any] | None = None,
          **kwargs: Any) -> Any:
    """Build a component of ``kind`` from a name, dotted path, mapping or instance.

    ``kwargs`` are arguments of the top node given by a Python caller (they override the
    spec's keys and may set runtime arguments); ``context`` the runtime values of nested
    nodes. An object that is already built is returned unchanged (with no kwargs).
    """
    ctx = context if isinstance(context, Context) else Context(context or {})
    return _node(kind, spec, (kind or "") if path is None else path, ctx, False, kwargs)


def check(kind: str | None, spec: Any, path: str | None = None, context: Context | None = None,
          **kwargs: Any) -> Any:
    """The walk of :func:`build` building nothing; returns the top node's class."""
    return _node(kind, spec, (kind or "") if path is None else path, context or Context(), True, kwargs)


def build_settings(cls: type, values: Any, path: str) -> Any:
    """A settings dataclass (a config section such as ``train`` or ``evaluate``) from a
    mapping: its keys checked like a component's, a nested settings mapping built the
    same way (``evaluate.iwae``), every other value passed as written (a section's policy
    specs are walked by whoever builds them, with their kind). Range errors raised by the
    dataclass name a key of its own; the path is prefixed here."""
    if values is None:
        values = {}
    d = _as_dict(values)
    if d is None:
        raise ConfigError(path, f"must be a mapping of {cls.__name__} keys, got {type(values).__name__}")
    check_args(cls, d, path)
    hints = _hints(cls)
    for key, value in d.items():
        nested = _dataclass_of(hints.get(key))
        if nested is not None and _as_dict(value) is not None:
            d[key] = build_settings(nested, value, _join(path, key))
    try:
        return cls(**d)
    except ConfigError as e:
        raise ConfigError(_join(path, e.path), e.message) from None
