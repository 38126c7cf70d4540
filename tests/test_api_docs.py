"""Every public object has a one-line docstring summary and complete type hints."""

import inspect

import pytest

import lrfind
from lrfind import data, schedules, suggest

CLASSES = [lrfind.Learner, lrfind.Recorder, lrfind.LRFindResult, lrfind.Callback,
           lrfind.ParamScheduler, lrfind.TorchScheduler, lrfind.Checkpoint,
           lrfind.EarlyStopping, lrfind.SaveBest]


def public_objects():
    """(name, object) for every documented function, class, method and property."""
    found = {}
    for module, names in [(lrfind, lrfind.__all__), (schedules, schedules.__all__),
                          (data, data.__all__), (suggest, suggest.__all__)]:
        for name in names:
            obj = getattr(module, name)
            if inspect.isfunction(obj) or inspect.isclass(obj):
                found[f"{module.__name__}.{name}"] = obj
    for cls in CLASSES:
        for name, obj in inspect.getmembers(cls):  # inherited ones too
            if isinstance(obj, property):
                obj = obj.fget
            if not name.startswith("_") and inspect.isfunction(obj):
                found[f"{cls.__name__}.{name}"] = obj
        found[f"{cls.__name__}.__init__"] = cls.__init__
    return found


OBJECTS = public_objects()


def test_the_walk_finds_the_public_api():
    for name in ("lrfind.Learner", "lrfind.schedules.one_cycle", "lrfind.data.digits",
                 "lrfind.suggest.suggestion_input", "Learner.fit_one_cycle",
                 "Recorder.losses", "LRFindResult.plot", "Callback.before_fit",
                 "TorchScheduler.after_epoch", "SaveBest.improved", "EarlyStopping.__init__"):
        assert name in OBJECTS
    assert len(OBJECTS) > 100


@pytest.mark.parametrize("name", [n for n in OBJECTS if not n.endswith(".__init__")])
def test_docstring_starts_with_a_one_line_summary(name):
    obj = OBJECTS[name]
    # a method that overrides a documented one inherits its docstring; a class needs its own
    doc = inspect.cleandoc(obj.__doc__ or "") if inspect.isclass(obj) else inspect.getdoc(obj)
    assert doc, f"{name} has no docstring"
    lines = doc.splitlines()
    assert lines[0].strip(), f"{name}: the docstring starts with an empty line"
    assert len(lines) == 1 or not lines[1].strip(), f"{name}: the summary runs past one line"


@pytest.mark.parametrize("name", [n for n in OBJECTS if not inspect.isclass(OBJECTS[n])])
def test_parameters_and_return_are_annotated(name):
    if OBJECTS[name] is object.__init__:
        return
    sig = inspect.signature(OBJECTS[name])
    for p in sig.parameters.values():
        if p.name != "self" and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
            assert p.annotation is not p.empty, f"{name}: parameter {p.name} has no type hint"
    assert sig.return_annotation is not sig.empty, f"{name}: no return type hint"


def test_learner_lr_find_has_the_defaults_of_lr_find():
    ours = inspect.signature(lrfind.Learner.lr_find).parameters
    plain = inspect.signature(lrfind.lr_find).parameters
    assert {k: p.default for k, p in ours.items() if k != "self"} == {
        k: plain[k].default for k in ours if k != "self"}
