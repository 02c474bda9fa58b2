"""One error contract: every invalid option of every public function raises a StructPruneError subclass
whose message says what to pass instead, before anything is traced or changed."""
from __future__ import annotations

import pytest
from helpers import Small, X, assert_unchanged, snapshot

import structprune as sp

# option -> (a bad value, a phrase the message must contain: what to pass instead)
BAD_SLIM_OPTIONS = {
    "ratio": (1.5, "pass e.g."),
    "criterion": ("bogus", "choose one of"),
    "scope": ("everywhere", "'local', 'global'"),
    "target": ({"flops": 0.5}, "must name one of 'params', 'macs'"),
    "max_group_ratio": (2.0, "pass e.g. max_group_ratio"),
    "round_to": (0, "positive integer"),
    "ignore": (3.5, "module names or globs"),
    "ratios": ({"layer.*": 1.5}, "pass e.g."),
    "data": (7, "iterable of calibration batches"),
    "loss_fn": ("mse", "a function (model, batch)"),
    "reduction": ("median", "'mean', 'sum', 'max'"),
    "normalize": ("l2", "'mean', 'max', 'sum'"),
    "seed": (1.5, "pass e.g. seed=0"),
    "verify": ("yes", "True or False"),
    "inplace": (1, "True or False"),
    "tracer": ("jit", "'auto', 'fx', 'export'"),
    "attention": ("all", "'heads', 'head_dims'"),
    "hidden": ("no", "True or False"),
}


def _entry_points():
    """Every public function that takes pruning options, as ``call(**options)``."""
    return {
        "slim": lambda **kw: sp.slim(Small(), X, **kw),
        "slim_with_report": lambda **kw: sp.slim_with_report(Small(), X, **kw),
        "Pruner": lambda **kw: sp.Pruner(Small(), X, kw.pop("ratio", 0.5), **kw),
        "SoftPruner": lambda **kw: sp.SoftPruner(Small(), X, **kw),
        "LotteryTicket": lambda **kw: sp.LotteryTicket(Small(), X).prune_and_rewind(kw.pop("ratio", 0.5), **kw),
        "regularizer": lambda **kw: sp.regularizer(Small(), "group_lasso", 1e-4, example_input=X, **kw),
        "sparsify(channel)": lambda **kw: sp.sparsify(Small(), kw.pop("ratio", 0.5), "channel", example_input=X,
                                                      **kw),
    }


# options an entry point has no use for are refused by name (also a StructPruneError)
_NOT_TAKEN = {
    "Pruner": {"target"},
    "sparsify(channel)": {"verify", "inplace", "target"},
    "SoftPruner": {"inplace"},
    "LotteryTicket": {"verify", "inplace"},
    "regularizer": {"verify", "inplace"},
}


@pytest.mark.parametrize("entry", list(_entry_points()))
@pytest.mark.parametrize("option", list(BAD_SLIM_OPTIONS))
def test_every_invalid_option_of_every_entry_point_says_what_to_pass(entry, option):
    value, hint = BAD_SLIM_OPTIONS[option]
    call = _entry_points()[entry]
    with pytest.raises(sp.StructPruneError) as caught:
        call(**{option: value})
    if option not in _NOT_TAKEN.get(entry, set()):
        assert hint in str(caught.value), f"{entry}({option}={value!r}): {caught.value}"
    assert isinstance(caught.value, (ValueError, TypeError))


@pytest.mark.parametrize("entry", list(_entry_points()))
def test_a_misspelt_option_names_the_closest_one(entry):
    with pytest.raises(sp.InvalidOptionError, match="did you mean 'round_to'"):
        _entry_points()[entry](rounds_to=8)


def test_invalid_options_leave_the_model_untouched():
    model = Small()
    snap = snapshot(model)
    for option, (value, _) in BAD_SLIM_OPTIONS.items():
        with pytest.raises(sp.StructPruneError):
            sp.slim(model, X, inplace=True, **{option: value}) if option != "inplace" else \
                sp.slim(model, X, inplace=value)
    assert_unchanged(model, snap)


BAD_OTHER_CALLS = {
    "sparsify granularity": (lambda: sp.sparsify(Small(), 0.5, "block"), "'element', 'nm'"),
    "sparsify sparsity": (lambda: sp.sparsify(Small(), 1.5), "pass e.g. sparsity=0.5"),
    "sparsify scope": (lambda: sp.sparsify(Small(), 0.5, scope="all"), "'local', 'global'"),
    "sparsify axis": (lambda: sp.sparsify(Small(), 0.5, "vector", axis="diagonal"), "'row', 'column'"),
    "sparsify criterion": (lambda: sp.sparsify(Small(), 0.5, criterion="bogus"), "choose one of"),
    "sparsify channel-only criterion": (lambda: sp.sparsify(Small(), 0.5, criterion="fpgm"), "granularity='channel'"),
    "sparsify n:m": (lambda: sp.sparsify(Small(), granularity="nm", n=4, m=4), "pass e.g. n=2, m=4"),
    "sparsify stray option": (lambda: sp.sparsify(Small(), 0.5, round_to=8), "granularity='channel'"),
    "sparsify model": (lambda: sp.sparsify("model", 0.5), "torch.nn.Module"),
    "regularizer kind": (lambda: sp.regularizer(Small(), "l0", 1e-4), "'bn_l1', 'group_lasso'"),
    "regularizer strength": (lambda: sp.regularizer(Small(), "bn_l1", -1.0), "pass e.g. 1e-4"),
    "regularizer example_input": (lambda: sp.regularizer(Small(), "group_lasso", 1e-4), "example_input"),
    "Iterative steps": (lambda: sp.Iterative(steps=0), "pass e.g. steps=5"),
    "Iterative curve": (lambda: sp.Iterative(curve="exp"), "'linear', 'cubic'"),
    "Pruner schedule": (lambda: sp.Pruner(Small(), X, 0.5, schedule="cubic"), "sp.Iterative"),
    "Pruner ratio": (lambda: sp.Pruner(Small(), X, 1.2), "pass e.g. ratio=0.5"),
    "LotteryTicket granularity": (lambda: sp.LotteryTicket(Small(), X).prune_and_rewind(0.5, granularity="kernel"),
                                  "'channel', 'element'"),
    "DependencyGraph tracer": (lambda: sp.DependencyGraph(Small(), X, tracer="jit"), "'auto', 'fx', 'export'"),
    "DependencyGraph attention": (lambda: sp.DependencyGraph(Small(), X, attention="all"), "'heads', 'head_dims'"),
    "register_size_attribute role": (lambda: sp.register_size_attribute("width", "w"), "'heads'"),
    "register_criterion structure": (lambda: sp.register_criterion("x", structure="max"), "'sum', 'mean'"),
    "apply_masks option": (lambda: sp.apply_masks(Small(), X, ratio=0.5), "no option 'ratio'"),
    "slim model": (lambda: sp.slim("model", X), "torch.nn.Module"),
    "load target": (lambda: sp.load("nowhere", 3), "nn.Module or a function"),
    "save model": (lambda: sp.save("model", "somewhere"), "pass the model itself"),
    "save onto a file": (lambda: sp.save(Small(), __file__), "pass a new or existing directory"),
    "report model": (lambda: sp.report("model", Small(), X), "pass the model itself"),
    "report flag": (lambda: sp.report(Small(), Small(), X, latency="yes"), "True or False"),
    "count_parameters model": (lambda: sp.count_parameters(3), "pass the model itself"),
    "summary limit": (lambda: sp.DependencyGraph(Small(), X).summary(limit="all"), "pass e.g. limit=40"),
    "remove_masks model": (lambda: sp.remove_masks(3), "pass the model itself"),
    "sparsity_report model": (lambda: sp.sparsity_report(3), "pass the model itself"),
    "Pruner progress": (lambda: sp.Pruner(Small(), X, 0.5, progress="yes"), "True or False"),
    "LotteryTicket model": (lambda: sp.LotteryTicket(3, X), "pass the model itself"),
    "rule target": (lambda: sp.rule("foo"), "'.method', 'aten.op'"),
    "rule aten name": (lambda: sp.rule("aten.not_an_op"), "names no ATen operator"),
    "updater target": (lambda: sp.updater(3), "module classes (nn.Conv2d)"),
    "register_criterion name": (lambda: sp.register_criterion(123), "non-empty str"),
    "get_criterion type": (lambda: sp.get_criterion(42), "a name"),
    "register_granularity": (lambda: sp.register_granularity("x"), "a Granularity instance"),
    "register_size_attribute name": (lambda: sp.register_size_attribute("heads", 3), "an attribute name"),
    "list_ops kind": (lambda: sp.list_ops("modules"), "'module', 'function'"),
    "sparsify targets": (lambda: sp.sparsify(Small(), 0.5, targets=[3]), "parameter-name globs"),
}


@pytest.mark.parametrize("name", list(BAD_OTHER_CALLS))
def test_other_invalid_options_raise_the_library_error(name):
    call, hint = BAD_OTHER_CALLS[name]
    with pytest.raises(sp.StructPruneError) as caught:
        call()
    assert hint in str(caught.value), f"{name}: {caught.value}"


def test_options_are_typed_sections_built_in_one_place():
    options = sp.Options.from_kwargs(ratio=0.3, scope="global", tracer="fx", criterion="l1", verify=False)
    assert options.plan.ratio == 0.3 and options.plan.scope == "global"
    assert options.trace.tracer == "fx" and options.score.criterion == "l1" and options.prune.verify is False
    assert set(sp.Options.names()) >= set(BAD_SLIM_OPTIONS)
    with pytest.raises(sp.InvalidOptionError):
        options.replace(scope="nowhere")
