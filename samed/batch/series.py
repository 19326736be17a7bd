"""Which series of a real study ``samed segment`` segments, and why it skips the others.

A study from a scanner or a PACS holds many series: scouts, several MR sequences, derived
objects (SEG, RTSTRUCT, presentation states, reports). Every series is checked against two
sets of rules, and a series that fails one is not a case but a row of the summary's
``skipped_series`` (with the reason):

* always: non-image objects (SEG, RTSTRUCT, RTDOSE, RTPLAN, PR, SR, KO, ...: any series without
  image planes, see :mod:`samed.io.dicom`) and localizers (every file's ``ImageType`` contains
  ``LOCALIZER``, or the SeriesDescription names a scout: ``scout``, ``localizer``/``localiser``,
  ``topogram``, ``surview``, ``3-plane loc``);
* the user's ``--series-filter`` rules, each ``KEY=VALUE`` and all of them required:

  ``description=REGEX``  SeriesDescription matches (``re.search``, case-insensitive);
  ``modality=MR|CT``     Modality is one of the ``|``-separated values (case-insensitive);
  ``min-slices=N``       at least N files (slices) in the series;
  ``image-type=REGEX``   the first file's ImageType, joined with ``\\``, matches (e.g.
                         ``image-type=^ORIGINAL`` skips DERIVED series).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

__all__ = ["SeriesFilter", "SkippedSeries", "SCOUT_DESCRIPTION", "parse_series_filter"]

#: SeriesDescriptions taken as scouts even when ImageType does not say LOCALIZER.
SCOUT_DESCRIPTION = re.compile(
    r"\b(scout|locali[sz]er|topogram|surview|3[- ]?plane[ _-]?loc)", re.IGNORECASE
)
_KEYS = ("description", "modality", "min-slices", "image-type")


@dataclass(frozen=True)
class SkippedSeries:
    """A series that is not a case, and why.

    Attributes:
        source: the folder it was found in, or the DICOMweb server root.
        series_uid: SeriesInstanceUID.
        modality: Modality.
        description: SeriesDescription.
        n_files: number of files (instances).
        reason: why it was skipped (one sentence).
    """

    source: str
    series_uid: str
    modality: str
    description: str
    n_files: int
    reason: str

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class SeriesFilter:
    """The ``--series-filter`` rules (all must hold); the default instance has none.

    Attributes:
        description: pattern SeriesDescription must match (``re.search``), or None.
        modalities: allowed Modality values (upper case), or None for any.
        min_slices: minimum number of files in the series.
        image_type: pattern the first file's ImageType (joined with ``\\``) must match, or None.
    """

    description: re.Pattern[str] | None = None
    modalities: frozenset[str] | None = None
    min_slices: int = 1
    image_type: re.Pattern[str] | None = None

    def rejects(
        self,
        *,
        modality: str,
        description: str,
        n_files: int,
        is_image: bool = True,
        is_localizer: bool = False,
        image_type: Sequence[str] | None = None,
    ) -> str:
        """Why a series is skipped, or ``""`` when it is a case.

        Args:
            modality: Modality.
            description: SeriesDescription.
            n_files: files (instances) in the series.
            is_image: whether the files carry image planes.
            is_localizer: whether every file's ImageType says LOCALIZER.
            image_type: the first file's ImageType values (None: unknown; an ``image-type``
                rule then is not checked, e.g. before a DICOMweb series is retrieved).
        """
        if not is_image:
            return f"not an image series (Modality {modality or 'blank'}: a derived object)"
        if is_localizer:
            return "localizer (ImageType LOCALIZER)"
        if SCOUT_DESCRIPTION.search(description or ""):
            return f"localizer (SeriesDescription {description!r} names a scout)"
        if self.modalities is not None and (modality or "").upper() not in self.modalities:
            return f"--series-filter modality={'|'.join(sorted(self.modalities))}: Modality is {modality or 'blank'}"
        if self.description is not None and not self.description.search(description or ""):
            return f"--series-filter description={self.description.pattern}: SeriesDescription is {description!r}"
        if n_files < self.min_slices:
            return f"--series-filter min-slices={self.min_slices}: {n_files} slice(s)"
        if self.image_type is not None and image_type is not None:
            joined = "\\".join(str(v) for v in image_type)
            if not self.image_type.search(joined):
                return (
                    f"--series-filter image-type={self.image_type.pattern}: ImageType is {joined!r}"
                )
        return ""

    def setting(self) -> dict[str, Any]:
        """The rules as JSON (recorded with the run's settings)."""
        return {
            "description": self.description.pattern if self.description else None,
            "modality": sorted(self.modalities) if self.modalities is not None else None,
            "min_slices": self.min_slices,
            "image_type": self.image_type.pattern if self.image_type else None,
        }


def _compile(value: str, key: str) -> re.Pattern[str]:
    try:
        return re.compile(value, re.IGNORECASE)
    except re.error as exc:
        raise ValueError(
            f"--series-filter {key}={value!r} is not a valid regular expression: {exc}"
        ) from None


def parse_series_filter(rules: Sequence[str] | str | None) -> SeriesFilter:
    """Build a :class:`SeriesFilter` from ``KEY=VALUE`` rules (see the module docstring).

    Args:
        rules: rules (one per ``--series-filter``); a single string is one rule; None: none.

    Raises:
        ValueError: a rule without ``=``, an unknown key (allowed: description, modality,
            min-slices, image-type), a bad regular expression or a min-slices that is not an
            integer >= 1; a key given twice.
    """
    if rules is None:
        return SeriesFilter()
    items = [rules] if isinstance(rules, str) else list(rules)
    seen: dict[str, str] = {}
    for rule in items:
        key, sep, value = str(rule).partition("=")
        key = key.strip().lower().replace("_", "-")
        if not sep or key not in _KEYS:
            raise ValueError(
                f"--series-filter {rule!r}: expected KEY=VALUE with KEY one of {list(_KEYS)}"
            )
        if key in seen:
            raise ValueError(f"--series-filter {key} is given twice ({seen[key]!r}, {value!r})")
        seen[key] = value
    kwargs: dict[str, Any] = {}
    if "description" in seen:
        kwargs["description"] = _compile(seen["description"], "description")
    if "image-type" in seen:
        kwargs["image_type"] = _compile(seen["image-type"], "image-type")
    if "modality" in seen:
        mods = frozenset(m.strip().upper() for m in seen["modality"].split("|") if m.strip())
        if not mods:
            raise ValueError("--series-filter modality= names no modality (e.g. modality=MR|CT)")
        kwargs["modalities"] = mods
    if "min-slices" in seen:
        try:
            n = int(seen["min-slices"])
        except ValueError:
            n = 0
        if n < 1:
            raise ValueError(
                f"--series-filter min-slices={seen['min-slices']!r} must be an integer >= 1"
            )
        kwargs["min_slices"] = n
    return SeriesFilter(**kwargs)
