"""Optional frameworks: how an integration imports one, and the one message when it is missing.

Every integration (`logix.integrations.huggingface`, `.accelerate`, `.deepspeed`, `.lightning`)
goes through `require` (or `require_installed`), so a missing framework is always a
MissingExtraError (an ImportError) that names the package, its version requirement, the extra of
the `logix-tda` distribution, and the pip commands for an install from PyPI, a checkout or git:

    logix.integrations.lightning needs lightning, which is not installed: pip install 'lightning>=2.0'
    (or install logix with the extra: pip install 'logix-tda[lightning]', or pip install -e '.[lightning]'
    in a checkout)

The requirement comes from the installed distribution's metadata, so it cannot drift from
pyproject.toml; FALLBACK is used only where that metadata cannot be read (a checkout on sys.path).
"""

from __future__ import annotations

import importlib
import importlib.metadata
import importlib.util
import json
import re
from types import ModuleType

from .errors import MissingExtraError

DISTRIBUTION = "logix-tda"

# pyproject.toml's optional dependencies, for when the distribution's metadata is absent
FALLBACK = {
    "hf": {"transformers": "transformers>=4.40", "accelerate": "accelerate>=0.30", "peft": "peft>=0.10"},
    "deepspeed": {"deepspeed": "deepspeed>=0.14"},
    "lightning": {"lightning": "lightning>=2.0"},
}


def _canonical(name: str) -> str:
    """PEP 503 name normalisation: Foo_Bar and foo-bar are one package."""
    return re.sub(r"[-_.]+", "-", name).lower()


def requirement(package: str, extra: str) -> str:
    """The specifier (e.g. 'lightning>=2.0') that logix-tda's `extra` gives `package`."""
    try:
        lines = importlib.metadata.requires(DISTRIBUTION) or []
    except importlib.metadata.PackageNotFoundError:
        lines = []
    marker = re.compile(r"""extra\s*==\s*["']""" + re.escape(extra) + """["']""")
    for line in lines:
        spec, _, condition = line.partition(";")
        name = re.match(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)", spec)
        if name and _canonical(name.group(1)) == _canonical(package) and marker.search(condition):
            return re.sub(r"[\s()]", "", spec)  # older metadata writes 'name (>=1.0)'
    return FALLBACK.get(extra, {}).get(package, package)


def _git_source() -> str | None:
    """'git+URL[@rev]' when logix was installed from a git URL (PEP 610 direct_url.json), else None."""
    try:
        text = importlib.metadata.distribution(DISTRIBUTION).read_text("direct_url.json")
        info = json.loads(text) if text else {}
    except (importlib.metadata.PackageNotFoundError, ValueError, OSError):
        return None
    vcs = info.get("vcs_info") if isinstance(info, dict) else None
    if not isinstance(vcs, dict) or vcs.get("vcs") != "git" or not isinstance(info.get("url"), str):
        return None
    revision = vcs.get("requested_revision")
    return f"git+{info['url']}" + (f"@{revision}" if isinstance(revision, str) and revision else "")


def missing_message(integration: str, package: str, extra: str, reason: str = "which is not installed") -> str:
    """The one sentence every integration gives for a missing framework."""
    ways = [f"pip install '{DISTRIBUTION}[{extra}]'", f"pip install -e '.[{extra}]' in a checkout"]
    git = _git_source()
    if git is not None:
        ways.append(f"pip install '{DISTRIBUTION}[{extra}] @ {git}'")
    return (
        f"{integration} needs {package}, {reason}: pip install '{requirement(package, extra)}' "
        f"(or install logix with the extra: {', or '.join(ways)})"
    )


def _not_installed(error: ImportError, module: str) -> bool:
    """True when `error` says `module` (or a package above it) is absent, not that it failed inside."""
    name = getattr(error, "name", None)
    return isinstance(error, ModuleNotFoundError) and name is not None and (module + ".").startswith(name + ".")


def require(integration: str, extra: str, package: str, *modules: str) -> ModuleType:
    """Import the first of `modules` (default: `package`) that imports; none: MissingExtraError.

    A framework that is installed but fails to import says so (with its own error chained), so a
    broken install is not mistaken for a missing one.
    """
    first = None
    for module in modules or (package,):
        try:
            return importlib.import_module(module)
        except ImportError as e:
            if first is None or (_not_installed(first[1], first[0]) and not _not_installed(e, module)):
                first = (module, e)
    module, error = first
    reason = "which is not installed" if _not_installed(error, module) else f"which fails to import ({error})"
    raise MissingExtraError(missing_message(integration, package, extra, reason)) from error


def require_installed(integration: str, extra: str, package: str) -> None:
    """MissingExtraError unless `package` is installed, without importing it.

    For the adapters that only wrap objects the framework already built (Accelerate, DeepSpeed):
    they need no import of their own, and importing DeepSpeed costs seconds and picks its
    accelerator, which must stay the user's choice.
    """
    try:
        found = importlib.util.find_spec(package) is not None
    except ValueError:  # imported already, by a loader that set no __spec__
        found = True
    if not found:
        error = ModuleNotFoundError(f"No module named {package!r}", name=package)
        raise MissingExtraError(missing_message(integration, package, extra)) from error
