"""Coded concepts for DICOM SEG segments: what a label *is*, in SNOMED CT, with a display colour.

A DICOM SEG segment carries a Segmented Property Category and Type (DICOM CID 7150 / 7151, SNOMED
CT codes) so that a PACS or a viewer knows that segment 1 is the liver, not just "label 1". This
is a short list of the structures samed is used for; the codes are the ones pydicom's code
dictionary (``pydicom.sr.codedict.codes.SCT``) ships, written out here so that this module needs
neither pydicom nor torch. Colours are RGB 0..255 (close to 3D Slicer's anatomical colours).
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["Code", "Concept", "CONCEPTS", "find_concept", "ANATOMY", "ABNORMAL", "TISSUE"]

SCT = "SCT"


@dataclass(frozen=True)
class Code:
    """A coded value: ``(value, scheme designator, meaning)``, e.g. ``("10200004", "SCT", "Liver")``."""

    value: str
    scheme: str
    meaning: str


ANATOMY = Code("91723000", SCT, "Anatomical Structure")
ABNORMAL = Code("49755003", SCT, "Morphologically Abnormal Structure")
TISSUE = Code("85756007", SCT, "Tissue")


@dataclass(frozen=True)
class Concept:
    """What a segment is.

    Attributes:
        name: the label name offered to users (also the default segment label).
        category: Segmented Property Category (anatomy, abnormal structure, tissue).
        type: Segmented Property Type.
        color: RGB 0..255 display colour.
    """

    name: str
    category: Code
    type: Code
    color: tuple[int, int, int]


def _anatomy(name: str, value: str, meaning: str, color: tuple[int, int, int]) -> Concept:
    return Concept(name, ANATOMY, Code(value, SCT, meaning), color)


#: Concept name (lower case) -> :class:`Concept`.
CONCEPTS: dict[str, Concept] = {
    c.name.lower(): c
    for c in (
        _anatomy("liver", "10200004", "Liver", (221, 130, 101)),
        _anatomy("spleen", "78961009", "Spleen", (157, 108, 162)),
        _anatomy("kidney", "64033007", "Kidney", (185, 102, 83)),
        _anatomy("right kidney", "9846003", "Right kidney", (185, 102, 83)),
        _anatomy("left kidney", "18639004", "Left kidney", (185, 102, 83)),
        _anatomy("pancreas", "15776009", "Pancreas", (249, 180, 111)),
        _anatomy("stomach", "69695003", "Stomach", (216, 132, 105)),
        _anatomy("gallbladder", "28231008", "Gallbladder", (139, 150, 98)),
        _anatomy("aorta", "15825003", "Aorta", (224, 97, 76)),
        _anatomy("inferior vena cava", "64131007", "Inferior vena cava", (0, 151, 206)),
        _anatomy("esophagus", "32849002", "Esophagus", (211, 171, 143)),
        _anatomy("lung", "39607008", "Lung", (197, 165, 145)),
        _anatomy("heart", "80891009", "Heart", (206, 110, 84)),
        _anatomy("left ventricle", "87878005", "Left ventricle", (212, 126, 151)),
        _anatomy("right ventricle", "53085002", "Right ventricle", (111, 184, 210)),
        _anatomy("left atrium", "82471001", "Left atrium", (188, 95, 76)),
        _anatomy("myocardium", "74281007", "Myocardium", (178, 60, 60)),
        _anatomy("brain", "12738006", "Brain", (250, 250, 225)),
        _anatomy("hippocampus", "5366008", "Hippocampus", (220, 216, 20)),
        _anatomy("prostate", "41216001", "Prostate", (230, 158, 140)),
        _anatomy("bladder", "89837001", "Bladder", (222, 154, 132)),
        _anatomy("bone", "272673000", "Bone", (241, 214, 145)),
        Concept("tumour", ABNORMAL, Code("108369006", SCT, "Neoplasm"), (255, 220, 0)),
        Concept("lesion", ABNORMAL, Code("52988006", SCT, "Lesion"), (255, 160, 0)),
        Concept("mass", ABNORMAL, Code("4147007", SCT, "Mass"), (255, 120, 0)),
        Concept("edema", ABNORMAL, Code("79654002", SCT, "Edema"), (100, 200, 255)),
        Concept("tissue", TISSUE, TISSUE, (128, 174, 128)),
    )
}

_ALIASES = {
    "tumor": "tumour",
    "oedema": "edema",
    "neoplasm": "tumour",
    "lv": "left ventricle",
    "rv": "right ventricle",
    "myo": "myocardium",
    "ivc": "inferior vena cava",
    "kidney right": "right kidney",
    "kidney left": "left kidney",
    "kidney_right": "right kidney",
    "kidney_left": "left kidney",
}


def find_concept(name: str) -> Concept | None:
    """The concept for a label name (case, ``_`` / ``-`` and a few aliases ignored), or None."""
    key = " ".join(str(name).replace("_", " ").replace("-", " ").lower().split())
    key = _ALIASES.get(key, key)
    return CONCEPTS.get(key)
