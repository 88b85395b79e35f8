"""The registry: build by name / dotted path / mapping, checks before building."""

from __future__ import annotations

import pytest

from orderlab import registry
from orderlab.registry import ConfigError, build, check, register

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


class Loose:
    def __init__(self, **kwargs):
        self.kwargs = kwargs


@pytest.fixture
def kind(monkeypatch):
    """A kind of its own (module: this one, base: Widget), removed afterwards."""
    monkeypatch.setitem(registry._KINDS, KIND, (__name__, f"{__name__}:Widget"))
    monkeypatch.setitem(registry._REGISTRY, KIND, {})
    register(KIND, "gear")(Gear)
    register(KIND, "box")(Box)
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
    assert build(kind, {"_target_": f"{__name__}.Loose", "anything": 1}).kwargs == {"anything": 1}


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
        check(Gear, args, "part")
    else:
        with pytest.raises(ConfigError, match="must be") as info:
            check(Gear, args, "part")
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


def test_check_spec_recurses_into_nested_components_without_building():
    from orderlab.registry import ConfigError, check_spec

    cls = check_spec("objective", {"name": "set_nll", "process": {"name": "staggered", "d": 2}})
    assert cls.__name__ == "SetNLL"
    with pytest.raises(ConfigError, match=r"objective\.process\.dd: unknown key.*did you mean 'd'"):
        check_spec("objective", {"name": "set_nll", "process": {"name": "staggered", "dd": 2}})
    with pytest.raises(ConfigError, match=r"objective\.process: unknown process 'staggerd'.*did you mean 'staggered'"):
        check_spec("objective", {"name": "set_nll", "process": "staggerd"})
    with pytest.raises(ConfigError, match=r"policy\.process: missing required argument"):
        check_spec("policy", "schedule")
