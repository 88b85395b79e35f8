"""The registry: one walk that checks and builds components by name / dotted path /
mapping, with runtime values from a context."""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest

import orderlab
from orderlab import registry
from orderlab.registry import ConfigError, Context, build_settings, check_args, register

KIND = "test_widget"


class Widget:
    """Base class of the test-only kind."""


class Gear(Widget):
    def __init__(self, teeth: int, ratio: float = 1.0, oiled: bool = False, note: str | None = None):
        if teeth <= 0:
            raise ValueError("teeth must be positive")
        self.teeth, self.ratio, self.oiled, self.note = teeth, ratio, oiled, note


class Box(Widget):
    def __init__(self, inner: Widget, label: str = "box"):
        self.inner, self.label = inner, label


class Train(Widget):
    """A list of components, and a runtime value it needs."""

    needs = ("track",)

    def __init__(self, track: int, cars: list[Widget] | None = None, extra: object = None):
        if track < 1:
            raise ConfigError("track", "must be >= 1")  # a key of its own node
        self.track, self.cars, self.extra = track, cars or [], extra


class Sized(Widget):
    """Needs a width that its parent provides."""

    needs = ("width",)

    def __init__(self, width: int, scale: float = 1.0):
        self.width, self.scale = width, scale


class Holder(Widget):
    """Provides ``width`` to its children: its own ``count`` times 2."""

    provides = {"width": lambda args: 2 * args["count"]}

    def __init__(self, part: Widget, count: int = 3):
        self.part, self.count = part, count


class Loose:
    def __init__(self, **kwargs):
        self.kwargs = kwargs


def build(kind, spec, path=None, context=None, **kwargs):
    return registry.build(kind, spec, path=path, context=context, **kwargs)


def check(kind, spec, path=None, context=None, **kwargs):
    return registry.check(kind, spec, path=path, context=context, **kwargs)


@pytest.fixture
def kind(monkeypatch):
    """A kind of its own (base: Widget), removed afterwards."""
    orderlab.build  # noqa: B018  # the real kinds first (other tests use them)
    monkeypatch.setitem(registry._KINDS, KIND, Widget)
    monkeypatch.setitem(registry._REGISTRY, KIND, {})
    for name, cls in (("gear", Gear), ("box", Box), ("train", Train), ("sized", Sized), ("holder", Holder)):
        register(KIND, name)(cls)
    return KIND


def test_build_by_name_dotted_path_and_mapping(kind):
    g = build(kind, "gear", teeth=3)
    assert isinstance(g, Gear) and g.teeth == 3
    g = build(kind, {"name": "gear", "teeth": 4, "ratio": 2})
    assert g.teeth == 4 and g.ratio == 2
    g = build(kind, {"_target_": f"{__name__}.Gear", "teeth": 5})
    assert isinstance(g, Gear) and g.teeth == 5
    g = build(kind, f"{__name__}.Gear", teeth=6)
    assert g.teeth == 6
    assert build(kind, g) is g  # already built
    with pytest.raises(ConfigError, match="already built"):
        build(kind, g, teeth=1)
    assert build(None, {"_target_": f"{__name__}.Loose", "anything": 1}).kwargs == {"anything": 1}
    with pytest.raises(ConfigError, match="is not a test_widget"):  # a target of the wrong kind
        build(kind, {"_target_": f"{__name__}.Loose", "anything": 1})


def test_real_components_by_name():
    pol = build("policy", "threshold", tau=0.8)
    assert type(pol).__name__ != "" and "0.8" in repr(pol)
    assert "l2r" in registry.names("policy") and registry.names("task") == sorted(registry.names("task"))


def test_duplicate_registration_rejected(kind):
    register(kind, "gear")(Gear)  # the same object again: fine
    with pytest.raises(ValueError, match="already registered"):
        register(kind, "gear")(Box)


def test_unknown_name_and_key_suggest(kind):
    with pytest.raises(ConfigError, match="did you mean 'gear'") as info:
        build(kind, {"name": "gaer", "teeth": 1}, path="part")
    assert info.value.path == "part.name"
    with pytest.raises(ConfigError, match="did you mean 'teeth'") as info:
        build(kind, {"name": "gear", "teth": 1}, path="part")
    assert info.value.path == "part.teth"
    with pytest.raises(ConfigError, match="unknown component kind"):
        build("no_such_kind", "x")
    with pytest.raises(ConfigError, match="cannot import module"):
        build(kind, "no.such.module.Thing")
    with pytest.raises(ConfigError, match="either 'name' or '_target_'"):
        build(kind, {"name": "gear", "_target_": f"{__name__}.Gear"})
    with pytest.raises(ConfigError, match="needs a 'name'"):
        build(kind, {"teeth": 1})


def test_missing_argument(kind):
    with pytest.raises(ConfigError, match="missing required argument") as info:
        build(kind, {"name": "gear"}, path="part")
    assert info.value.path == "part.teeth"


@pytest.mark.parametrize(
    "key, value, ok",
    [
        ("teeth", "3", False),
        ("teeth", 3.0, False),
        ("teeth", True, False),
        ("teeth", None, False),
        ("ratio", 2, True),  # an int is a fine float
        ("ratio", "2", False),
        ("oiled", 1, False),
        ("oiled", True, True),
        ("note", None, True),
        ("note", 3, False),
    ],
)
def test_scalar_types(kind, key, value, ok):
    args = {"teeth": 2, key: value}
    if ok:
        check_args(Gear, args, "part")
    else:
        with pytest.raises(ConfigError, match="must be") as info:
            check_args(Gear, args, "part")
        assert info.value.path == f"part.{key}"


def test_constructor_errors_become_config_errors(kind):
    with pytest.raises(ConfigError, match="teeth must be positive") as info:
        build(kind, {"name": "gear", "teeth": 0}, path="part")
    assert info.value.path == "part"


def test_nested_spec_built_recursively(kind):
    b = build(kind, {"name": "box", "inner": {"name": "box", "inner": {"name": "gear", "teeth": 7}}})
    assert isinstance(b.inner, Box) and isinstance(b.inner.inner, Gear) and b.inner.inner.teeth == 7
    with pytest.raises(ConfigError, match="did you mean 'teeth'") as info:
        build(kind, {"name": "box", "inner": {"name": "gear", "teath": 1}}, path="thing")
    assert info.value.path == "thing.inner.teath"
    obj = build("objective", {"name": "set_nll", "process": {"name": "staggered", "d": 2}})
    assert type(obj.process).__name__ == "Staggered"


def test_omegaconf_specs(kind):
    from omegaconf import OmegaConf

    g = build(kind, OmegaConf.create({"name": "gear", "teeth": 9}))
    assert g.teeth == 9


def test_check_recurses_into_nested_components_without_building():
    cls = orderlab.check("objective", {"name": "set_nll", "process": {"name": "staggered", "d": 2}})
    assert cls.__name__ == "SetNLL"
    with pytest.raises(ConfigError, match=r"objective\.process\.dd: unknown key.*did you mean 'd'"):
        orderlab.check("objective", {"name": "set_nll", "process": {"name": "staggered", "dd": 2}})
    with pytest.raises(ConfigError, match=r"objective\.process: unknown process 'staggerd'.*did you mean 'staggered'"):
        orderlab.check("objective", {"name": "set_nll", "process": "staggerd"})
    with pytest.raises(ConfigError, match=r"policy\.process: missing required argument"):
        orderlab.check("policy", "schedule")


def test_every_nested_node_is_walked_with_its_full_path():
    """The issue's case: a typo four components deep is reported with its whole path."""
    spec = {"name": "grpo", "policy": {"name": "learned", "net": {"name": "mlp", "hiden": 8}}}
    ctx = Context({"task": registry.DEFERRED})
    with pytest.raises(ConfigError, match="did you mean 'hidden'") as info:
        orderlab.check("objective", spec, path="stages.policy.objective", context=ctx)
    assert info.value.path == "stages.policy.objective.policy.net.hiden"
    spec["policy"]["net"] = {"name": "mlp", "hidden": 8}
    assert orderlab.check("objective", spec, context=ctx).__name__ == "GRPO"
    # the guide of vi_orders too (a policy_net spec, its in_features provided by vi_orders)
    with pytest.raises(ConfigError) as info:
        orderlab.check("objective", {"name": "vi_orders", "guide": {"name": "mlp", "layers": "x"}})
    assert info.value.path == "objective.guide.layers"


def test_lists_and_untyped_arguments_are_walked(kind):
    t = build(kind, {"name": "train", "cars": [{"name": "gear", "teeth": 1}, "box" if False else {"name": "gear", "teeth": 2}],
                     "extra": {"_target_": f"{__name__}.Gear", "teeth": 5}}, context={"track": 2})
    assert [c.teeth for c in t.cars] == [1, 2] and isinstance(t.extra, Gear) and t.extra.teeth == 5
    with pytest.raises(ConfigError, match="did you mean 'teeth'") as info:
        check(kind, {"name": "train", "cars": [{"name": "gear", "teeth": 1}, {"name": "gear", "teth": 2}]},
              path="t", context=Context({"track": 1}))
    assert info.value.path == "t.cars[1].teth"
    with pytest.raises(ConfigError, match="teeth must be positive") as info:  # an untyped argument: _target_ works
        build(kind, {"name": "train", "extra": {"_target_": f"{__name__}.Gear", "teeth": 0}}, path="t",
              context={"track": 1})
    assert info.value.path == "t.extra"
    with pytest.raises(ConfigError, match="cannot tell what kind") as info:  # ... a bare name cannot say its kind
        check(kind, {"name": "train", "extra": {"name": "gear", "teeth": 1}}, path="t", context=Context({"track": 1}))
    assert info.value.path == "t.extra"


def test_runtime_values_come_from_the_context(kind):
    t = build(kind, "train", context={"track": 4})
    assert t.track == 4
    with pytest.raises(ConfigError, match="needs 'track' at run time") as info:
        check(kind, "train", path="t")
    assert info.value.path == "t"
    ctx = Context().set("track", registry.DEFERRED, "the rails section")
    assert check(kind, "train", context=ctx) is Train  # the check pass: present, not computed
    with pytest.raises(ConfigError, match="is set by the rails section") as info:  # required: never in the spec
        check(kind, {"name": "train", "track": 3}, path="t", context=ctx)
    assert info.value.path == "t.track"
    assert build(kind, "train", track=7).track == 7  # a Python caller may give it
    calls = []
    lazy = Context().lazy("track", lambda: calls.append(1) or 5)
    assert build(kind, "train", context=lazy).track == 5 and build(kind, "train", context=lazy).track == 5
    assert calls == [1]  # computed once, on first use


def test_constructor_config_errors_are_prefixed_with_the_node_path(kind):
    with pytest.raises(ConfigError, match="must be >= 1") as info:
        build(kind, {"name": "box", "inner": {"name": "train"}}, path="a.b", context={"track": 0})
    assert info.value.path == "a.b.inner.track"


def test_parents_provide_values_to_their_children(kind):
    h = build(kind, {"name": "holder", "part": {"name": "sized", "scale": 0.5}, "count": 4})
    assert h.part.width == 8 and h.part.scale == 0.5
    assert build(kind, {"name": "holder", "part": "sized"}).part.width == 6  # the parent's default count
    with pytest.raises(ConfigError, match="needs 'width'"):
        check(kind, "sized")  # no parent provides it
    assert check(kind, {"name": "holder", "part": "sized"}) is Holder


@dataclass
class Inner:
    k: int = 1

    def __post_init__(self):
        if self.k < 1:
            raise ConfigError("k", "must be >= 1")


@dataclass
class Section:
    n: int = 2
    inner: Inner | None = None
    specs: list = field(default_factory=list)


def test_settings_sections():
    s = build_settings(Section, {"n": 3, "inner": {"k": 2}, "specs": [{"name": "anything"}]}, "sec")
    assert s.n == 3 and s.inner == Inner(2) and s.specs == [{"name": "anything"}]  # specs kept as written
    with pytest.raises(ConfigError, match="did you mean 'k'") as info:
        build_settings(Section, {"inner": {"kk": 2}}, "sec")
    assert info.value.path == "sec.inner.kk"
    with pytest.raises(ConfigError, match="must be >= 1") as info:
        build_settings(Section, {"inner": {"k": 0}}, "sec")
    assert info.value.path == "sec.inner.k"
    with pytest.raises(ConfigError, match="must be a mapping"):
        build_settings(Section, [1], "sec")


def test_kinds_are_declared_by_their_base_classes():
    from orderlab.objectives.base import Objective
    from orderlab.policies.base import Policy
    from orderlab.processes.base import Process

    orderlab.build  # noqa: B018  # imports every component package
    assert registry._KINDS["policy"] is Policy and registry._KINDS["process"] is Process
    assert registry._KINDS["objective"] is Objective
    assert {"process", "policy", "policy_net", "objective", "reward", "task", "attention", "model", "corruption"} <= set(
        registry.kinds())
    with pytest.raises(ValueError, match="no such kind"):
        register("no_such_kind", "x")(Loose)
    with pytest.raises(ConfigError, match="is not a policy"):
        orderlab.build("policy", {"_target_": f"{__name__}.Gear", "teeth": 1})


def test_every_registered_component_argument_that_takes_a_component_has_a_kind():
    """A constructor argument that holds a component must be annotated with a kind's base
    class, else a YAML name there could not be checked: every registered class, every
    argument whose default or annotation mentions a component base class, resolves."""
    import inspect

    orderlab.build  # noqa: B018
    for kind in registry.kinds():
        for name in registry.names(kind):
            cls = registry.lookup(kind, name)
            hints = registry._hints(cls)
            for arg, p in inspect.signature(cls).parameters.items():
                default = p.default
                if isinstance(default, tuple(registry._KINDS.values())):
                    assert registry._kind_of(hints.get(arg)) is not None, f"{kind} {name}: {arg}"
