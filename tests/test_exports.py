"""The packages' re-exports: every name in ``__all__`` imports (and is the object of its home module), the
public classes and documented functions of ``archlab.nn``'s modules are exported, no export hides a
submodule, and importing the packages in any order makes no cycle."""

from __future__ import annotations

import importlib
import inspect
import pkgutil
import re
import subprocess
import sys

import pytest

PACKAGES = ["archlab", "archlab.nn", "archlab.data", "archlab.train", "archlab.analysis"]

#: Public names of archlab.nn's modules deliberately not re-exported, and why.
NN_NOT_EXPORTED = {
    "linear": "the few-row product function: as archlab.nn.linear it would hide the module archlab.nn.linear",
    "release_workspace": "a CPU buffer detail of linear_cross_entropy: archlab.nn.loss.release_workspace",
    "Param": "one parameter of a backend spec (backends.parse_backend's table)",
}


def submodules(package_name: str):
    package = importlib.import_module(package_name)
    for info in pkgutil.iter_modules(package.__path__):
        yield info.name, importlib.import_module(f"{package_name}.{info.name}")


@pytest.mark.parametrize("package_name", PACKAGES)
def test_every_name_in_all_imports(package_name):
    package = importlib.import_module(package_name)
    names = package.__all__
    assert len(names) == len(set(names)), "duplicates in __all__"
    namespace: dict = {}
    exec(f"from {package_name} import *", namespace)  # noqa: S102
    assert set(names) <= set(namespace)
    for name in names:
        obj = getattr(package, name)
        home = getattr(obj, "__module__", None)
        if home is not None and home.startswith(package_name + "."):  # re-exported: the very object of its module
            assert getattr(importlib.import_module(home), name) is obj, name


@pytest.mark.parametrize("package_name", ["archlab.nn", "archlab.train", "archlab.analysis"])
def test_no_export_hides_a_submodule(package_name):
    package = importlib.import_module(package_name)
    for name, module in submodules(package_name):
        assert getattr(package, name) is module, f"{package_name}.{name} is not the module"


def test_nn_exports_each_modules_public_classes_and_documented_functions():
    import archlab.nn

    exported = set(archlab.nn.__all__)
    for module_name, module in submodules("archlab.nn"):
        own = {
            name for name, obj in vars(module).items()
            if not name.startswith("_") and getattr(obj, "__module__", None) == module.__name__
            and (inspect.isclass(obj) or inspect.isfunction(obj))
        }  # fmt: skip
        classes = {name for name in own if inspect.isclass(getattr(module, name))}
        documented = set(re.findall(r":(?:class|func):`~?(?:[\w.]*\.)?(\w+)`", module.__doc__ or "")) & own
        missing = (classes | documented) - exported - set(NN_NOT_EXPORTED)
        assert not missing, f"archlab.nn.{module_name}: {sorted(missing)} not exported"
    assert not exported & set(NN_NOT_EXPORTED)


def test_named_pieces_are_exported():
    import archlab.analysis
    import archlab.nn
    import archlab.train
    from archlab.nn.linear import Linear, PackedLinear
    from archlab.nn.loss import linear_cross_entropy
    from archlab.train.run import RunSpec
    from archlab.train.sources import DataConfig

    assert (archlab.nn.Linear, archlab.nn.PackedLinear) == (Linear, PackedLinear)
    assert archlab.nn.linear_cross_entropy is linear_cross_entropy
    for name in ("check_token_ids", "chunked_attention", "PerformerAttention", "LSTMCell", "CausalConv1d",
                 "apply_lora", "LoRALinear"):  # fmt: skip
        assert name in archlab.nn.__all__, name
    assert (archlab.train.RunSpec, archlab.train.DataConfig) == (RunSpec, DataConfig)
    for name in ("TrainConfig", "Trainer", "FitResult", "Checkpoint", "NoamSchedule", "train", "train_run"):
        assert name in archlab.train.__all__, name
    for name in ("count_parameters", "count_flops", "FlopCounter", "kv_cache_bytes"):
        assert name in archlab.analysis.__all__, name


def test_no_import_cycle_whatever_is_imported_first():
    """One fresh interpreter; for each module: forget every archlab module, import that one first, then
    the packages (a cycle fails on a half-made module). torch stays loaded, so each round is quick."""
    code = """
import sys
for first in ["archlab.train.run", "archlab.train.sources", "archlab.nn.efficient", "archlab.nn.lora",
              "archlab.analysis.flops", "archlab.cli"]:
    for name in [n for n in sys.modules if n == "archlab" or n.startswith("archlab.")]:
        del sys.modules[name]
    __import__(first)
    import archlab, archlab.nn, archlab.train, archlab.analysis, archlab.cli
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
