"""What an export's ``kvsweep_adapters.json`` holds (``ExportInfo``), its format version, and the paper or repository
each method's docstrings name."""

from __future__ import annotations

import sys
from dataclasses import asdict, dataclass

from . import __version__
from .adapters import AdapterSpec, adapter_class
from .config import DataCfg, KvsweepError, ModelCfg
from .latent.trial import TrialFigures

FORMAT = "kvsweep-adapters"
VERSION = 1  # an export of a higher version is refused; a lower one is read


class ExportError(KvsweepError):
    """An export that cannot be written or read: not an export, of a newer format, or weights that do not fit."""


@dataclass(frozen=True)
class ExportInfo:
    """What ``kvsweep_adapters.json`` holds, typed."""

    adapters: tuple[AdapterSpec, ...]  # as built, shapes resolved (what loading builds)
    trained_as: tuple[dict, ...]  # the trial's own specs (``AdapterSpec.to_dict()``)
    base: ModelCfg
    cache_dtype: str
    trial_id: str
    sweep: str | None
    source: str  # the folder it was exported from
    config: dict  # the trial's ``TrialCfg.to_dict()``
    figures: TrialFigures
    kvsweep_version: str
    exported_by_git_revision: str | None
    version: int = VERSION

    @property
    def data(self) -> DataCfg:
        return DataCfg(**self.config["data"])

    def to_json(self) -> dict:
        return {
            "format": FORMAT, "version": self.version,
            "adapters": [{"name": s.name, "options": asdict(s.options), "label": adapter_class(s.name).label(s.options),
                          "source": method_source(s.name)} for s in self.adapters],
            "trained_as": list(self.trained_as),
            "base": asdict(self.base),
            "cache_dtype": self.cache_dtype,
            "trial": {"id": self.trial_id, "sweep": self.sweep, "source": self.source, "config": self.config},
            "data": self.config["data"],
            "figures": asdict(self.figures),
            "kvsweep_version": self.kvsweep_version,
            "git_revision": self.figures.git_revision,
            "exported_by_git_revision": self.exported_by_git_revision,
        }

    @classmethod
    def from_json(cls, obj: dict, where: str) -> "ExportInfo":
        """Raises: ExportError: not a kvsweep export, or one of a newer format version."""
        if not isinstance(obj, dict) or obj.get("format") != FORMAT:
            raise ExportError(f"{where} is not a kvsweep export (its format is {obj.get('format') if isinstance(obj, dict) else None!r}, "
                              f"not {FORMAT!r})")
        version = obj.get("version")
        if not isinstance(version, int) or isinstance(version, bool) or version < 1:
            raise ExportError(f"{where}: format version {version!r} is not a version number")
        if version > VERSION:
            raise ExportError(f"{where} is an export of format version {version}, newer than this kvsweep "
                              f"({__version__}) reads (up to {VERSION}): load it with a newer kvsweep")
        try:
            trial = obj["trial"]
            return cls(
                adapters=tuple(AdapterSpec.parse(a["name"], **a["options"]) for a in obj["adapters"]),
                trained_as=tuple(obj["trained_as"]), base=ModelCfg(**obj["base"]), cache_dtype=obj["cache_dtype"],
                trial_id=trial["id"], sweep=trial["sweep"], source=trial["source"], config=trial["config"],
                figures=TrialFigures(**obj["figures"]), kvsweep_version=obj["kvsweep_version"],
                exported_by_git_revision=obj.get("exported_by_git_revision"), version=version)
        except (KeyError, TypeError) as e:
            raise ExportError(f"{where} is damaged: {type(e).__name__}: {e}") from None


def docstring_parts(name: str) -> tuple[str, str | None]:
    """(the first line, the "Source:" paragraph) of the docstrings of the method's module and of those it builds on."""
    summary, source = "", None
    for cls in adapter_class(name).__mro__:
        doc = getattr(sys.modules.get(cls.__module__), "__doc__", None) or ""
        if not summary and doc.strip():
            summary = " ".join(doc.strip().split("\n\n")[0].split())
        for para in doc.split("\n\n"):
            if source is None and para.strip().startswith("Source:"):
                source = " ".join(para.strip().removeprefix("Source:").split())
        if source is not None:
            break
    return summary, source


def method_source(name: str) -> str | None:
    """The paper or repository a method's docstrings name ("Source: ..."), or None."""
    return docstring_parts(name)[1]
