"""A missing optional framework: every integration raises one MissingExtraError naming the extra.

The framework is hidden by `sys.modules[name] = None` (Python then refuses to import it) and the
cached integration module is dropped, so the import runs again; monkeypatch puts both back.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import json
import sys
from pathlib import Path

import pytest

from logix import LogixError
from logix import extras as extras_module
from logix.errors import MissingExtraError
from logix.extras import FALLBACK, missing_message, require, requirement

# integration -> (packages to hide, the package named, the extra, its specifier in pyproject.toml)
INTEGRATIONS = {
    "huggingface": (["transformers"], "transformers", "hf", "transformers>=4.40"),
    "accelerate": (["accelerate"], "accelerate", "hf", "accelerate>=0.30"),
    "deepspeed": (["deepspeed"], "deepspeed", "deepspeed", "deepspeed>=0.14"),
    "lightning": (["lightning", "pytorch_lightning"], "lightning", "lightning", "lightning>=2.0"),
}


def import_without(monkeypatch, integration: str, hidden: list[str]):
    """Import logix.integrations.<integration> afresh with `hidden` packages (and their submodules) gone."""
    for name in list(sys.modules):
        if name.split(".")[0] in hidden:
            monkeypatch.delitem(sys.modules, name)
    for name in hidden:
        monkeypatch.setitem(sys.modules, name, None)
    adapter = f"logix.integrations.{integration}"
    for name in list(sys.modules):  # the adapter and, where it is a package, its modules
        if name == adapter or name.startswith(adapter + "."):
            monkeypatch.delitem(sys.modules, name)
    return importlib.import_module(adapter)


@pytest.mark.parametrize("integration", list(INTEGRATIONS))
def test_a_missing_framework_is_a_missing_extra_error_naming_the_extra(monkeypatch, integration):
    hidden, package, extra, spec = INTEGRATIONS[integration]
    with pytest.raises(MissingExtraError) as info:
        import_without(monkeypatch, integration, hidden)
    error = info.value
    assert isinstance(error, ImportError) and isinstance(error, LogixError)
    assert isinstance(error.__cause__, ImportError)  # the original import error is chained
    message = str(error)
    assert message.startswith(f"logix.integrations.{integration} needs {package}, which is not installed: ")
    assert f"pip install '{spec}'" in message
    assert f"pip install 'logix-tda[{extra}]'" in message
    assert f"pip install -e '.[{extra}]' in a checkout" in message


@pytest.mark.parametrize("integration", list(INTEGRATIONS))
def test_every_integration_gives_the_same_sentence(monkeypatch, integration):
    hidden, package, extra, _ = INTEGRATIONS[integration]
    with pytest.raises(MissingExtraError) as info:
        import_without(monkeypatch, integration, hidden)
    assert str(info.value) == missing_message(f"logix.integrations.{integration}", package, extra)


def test_the_sys_modules_are_restored_after_a_hidden_import():
    """Runs after the tests above: the real integration imports again (monkeypatch undid the hiding)."""
    pytest.importorskip("transformers")
    module = importlib.import_module("logix.integrations.huggingface")
    assert sys.modules.get("transformers") is not None
    assert module.TrainerCallback is importlib.import_module("transformers").TrainerCallback


def test_lightning_falls_back_to_the_standalone_package(monkeypatch):
    standalone = pytest.importorskip("pytorch_lightning")
    module = import_without(monkeypatch, "lightning", ["lightning"])
    assert module.Callback is standalone.callbacks.Callback


def test_the_requirement_comes_from_the_distribution_metadata(monkeypatch):
    """Metadata wins over the fallback, so the message follows pyproject.toml once reinstalled."""
    lines = ['lightning>=9.1; extra == "lightning"', 'transformers (>=7.0) ; extra == "hf"', "numpy>=1"]
    monkeypatch.setattr(importlib.metadata, "requires", lambda dist: lines if dist == "logix-tda" else None)
    assert requirement("lightning", "lightning") == "lightning>=9.1"
    assert requirement("Transformers", "hf") == "transformers>=7.0"  # normalised name; old '(...)' form
    assert requirement("deepspeed", "deepspeed") == "deepspeed>=0.14"  # not in metadata: the fallback
    with pytest.raises(MissingExtraError, match=r"pip install 'lightning>=9\.1'"):
        import_without(monkeypatch, "lightning", ["lightning", "pytorch_lightning"])


def test_without_metadata_the_fallback_names_the_requirement(monkeypatch):
    def absent(dist):
        raise importlib.metadata.PackageNotFoundError(dist)

    monkeypatch.setattr(importlib.metadata, "requires", absent)
    monkeypatch.setattr(importlib.metadata, "distribution", absent)
    with pytest.raises(MissingExtraError) as info:
        import_without(monkeypatch, "deepspeed", ["deepspeed"])
    assert "pip install 'deepspeed>=0.14'" in str(info.value) and "'logix-tda[deepspeed]'" in str(info.value)


def test_the_fallback_matches_pyproject():
    """FALLBACK is used only without metadata; it must still say what pyproject.toml says."""
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    pyproject = Path(__file__).resolve().parents[1] / "pyproject.toml"
    extras = tomllib.loads(pyproject.read_text())["project"]["optional-dependencies"]
    for extra, specs in FALLBACK.items():
        assert sorted(specs.values()) == sorted(extras[extra]), extra


def test_a_git_install_is_told_how_to_add_the_extra_from_git(monkeypatch):
    direct_url = {"url": "https://github.com/example/logix", "vcs_info": {"vcs": "git", "requested_revision": "v1"}}

    class Dist:
        requires = ['lightning>=2.0; extra == "lightning"']

        def read_text(self, name):
            return json.dumps(direct_url) if name == "direct_url.json" else None

    monkeypatch.setattr(importlib.metadata, "distribution", lambda dist: Dist())
    message = missing_message("logix.integrations.lightning", "lightning", "lightning")
    assert "pip install 'logix-tda[lightning] @ git+https://github.com/example/logix@v1'" in message
    assert "pip install 'logix-tda[lightning]'" in message  # the PyPI and checkout forms stay


def test_an_installed_but_broken_framework_is_not_called_missing(monkeypatch, tmp_path):
    (tmp_path / "logix_test_broken_framework.py").write_text("raise ImportError('libbroken.so: cannot open')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "logix_test_broken_framework", raising=False)
    with pytest.raises(MissingExtraError) as info:
        require("logix.integrations.x", "hf", "transformers", "logix_test_broken_framework")
    message = str(info.value)
    assert "which fails to import (libbroken.so: cannot open)" in message and "not installed" not in message
    assert "pip install 'logix-tda[hf]'" in message
    assert str(info.value.__cause__) == "libbroken.so: cannot open"


def test_require_returns_the_first_module_that_imports():
    assert require("logix.integrations.x", "hf", "json", "logix_no_such_module_anywhere", "json") is json
    assert extras_module.DISTRIBUTION == "logix-tda"
