"""The label table of the samed widget: each label's name, coded concept and colour.

The table edits the chosen labels layer's metadata, which the writer puts into DICOM SEG segment
descriptions (:func:`samed.io.save_dicom_seg`): ``samed_label_names`` (value -> name),
``samed_label_concepts`` (value -> a :data:`samed.io.codes.CONCEPTS` name, i.e. SNOMED CT
category and type) and ``samed_label_colors`` (value -> RGB 0..255); the layer shows the colours.
``samed_label_algorithm`` (value -> ``"SEMIAUTOMATIC"`` / ``"AUTOMATIC"``) is kept by the widget:
accepted interactive objects are semi-automatic, the automatic mode's classes automatic.
"""

from __future__ import annotations

from typing import Any

from qtpy.QtCore import Qt
from qtpy.QtGui import QColor
from qtpy.QtWidgets import QComboBox, QTableWidget, QTableWidgetItem

from samed.colors import label_color
from samed.io.codes import CONCEPTS, find_concept

__all__ = ["LabelTable", "label_info", "set_label_info", "apply_label_colors"]

NAMES, CONCEPT_KEY, COLORS, ALGORITHM = (
    "samed_label_names",
    "samed_label_concepts",
    "samed_label_colors",
    "samed_label_algorithm",
)


def label_info(layer: Any, value: int) -> tuple[str, str, tuple[int, int, int]]:
    """(name, concept name or "", RGB) of a label value on a labels layer."""
    meta = layer.metadata
    name = str(meta.get(NAMES, {}).get(value, f"label {value}"))
    concept = str(meta.get(CONCEPT_KEY, {}).get(value, ""))
    found = find_concept(concept or name)
    default = found.color if found is not None else tuple(label_color(value))
    rgb = tuple(int(c) for c in meta.get(COLORS, {}).get(value, default))
    return name, concept, rgb  # type: ignore[return-value]


def set_label_info(
    layer: Any,
    value: int,
    name: str | None = None,
    concept: str | None = None,
    color: tuple[int, int, int] | None = None,
) -> None:
    """Set a label's name, concept (a :data:`samed.io.codes.CONCEPTS` name or "") and colour.

    Raises:
        ValueError: an unknown concept, a label value < 1 or a colour outside 0..255.
    """
    value = int(value)
    if value < 1:
        raise ValueError(f"label value {value} must be >= 1 (0 is background)")
    meta = layer.metadata
    if name is not None:
        meta.setdefault(NAMES, {})[value] = str(name)
    if concept is not None:
        if concept and concept.lower() not in CONCEPTS:
            raise ValueError(f"unknown concept {concept!r}; choose one of {sorted(CONCEPTS)}")
        meta.setdefault(CONCEPT_KEY, {})[value] = concept.lower()
        if color is None and concept and value not in meta.get(COLORS, {}):
            color = CONCEPTS[concept.lower()].color
    if color is not None:
        rgb = tuple(int(c) for c in color)
        if len(rgb) != 3 or not all(0 <= c <= 255 for c in rgb):
            raise ValueError(f"colour {color!r} must be 3 integers in 0..255")
        meta.setdefault(COLORS, {})[value] = rgb
    apply_label_colors(layer)


def apply_label_colors(layer: Any, values: Any = ()) -> None:
    """Show the colours that go into DICOM SEG on the labels layer: the table's, else the
    concept's, else :func:`samed.colors.label_color` (for ``values`` and every named or coloured
    label; other values keep napari's colours)."""
    meta = layer.metadata
    wanted = {int(v) for v in values} | set(meta.get(COLORS, {})) | set(meta.get(NAMES, {}))
    if not wanted:
        return
    try:
        from napari.utils.colormaps import DirectLabelColormap

        table: dict[Any, Any] = {None: (0.5, 0.5, 0.5, 1.0), 0: (0, 0, 0, 0)}
        for v in wanted:
            table[int(v)] = (*(c / 255.0 for c in label_info(layer, int(v))[2]), 1.0)
        layer.colormap = DirectLabelColormap(color_dict=table)
    except (ImportError, TypeError, ValueError):  # older napari: the default colours stay
        pass


class LabelTable(QTableWidget):
    """Rows: label value, name, concept (combo of :data:`samed.io.codes.CONCEPTS`), colour.

    Args:
        on_change: called after a row was edited (the widget refreshes the layer).
    """

    HEADERS = ("Value", "Name", "Concept (SNOMED CT)", "Colour")

    def __init__(self, on_change: Any = None) -> None:
        super().__init__(0, len(self.HEADERS))
        self.setHorizontalHeaderLabels(self.HEADERS)
        self.verticalHeader().setVisible(False)
        self.horizontalHeader().setStretchLastSection(True)
        for col, width in enumerate((44, 110, 190)):
            self.setColumnWidth(col, width)
        self._layer: Any = None
        self._filling = False
        self._on_change = on_change
        self.itemChanged.connect(self._item_changed)

    def show_layer(self, layer: Any, active: int | None = None) -> None:
        """Fill the table from a labels layer: its named labels, present values and ``active``."""
        self._layer = layer
        self._filling = True
        try:
            self.setRowCount(0)
            if layer is None:
                return
            import numpy as np

            values = {int(v) for v in np.unique(np.asarray(layer.data)) if v != 0}
            values |= {int(v) for v in layer.metadata.get(NAMES, {})}
            if active:
                values.add(int(active))
            for v in sorted(values):
                self._add_row(v)
            apply_label_colors(layer, values)
        finally:
            self._filling = False

    def _add_row(self, value: int) -> None:
        name, concept, rgb = label_info(self._layer, value)
        row = self.rowCount()
        self.insertRow(row)
        item = QTableWidgetItem(str(value))
        item.setFlags(item.flags() & ~Qt.ItemFlag.ItemIsEditable)
        self.setItem(row, 0, item)
        self.setItem(row, 1, QTableWidgetItem(name))
        combo = QComboBox()
        combo.addItem("(from the name)", "")
        for key, c in CONCEPTS.items():
            combo.addItem(f"{c.name} ({c.type.meaning}, {c.type.value})", key)
        found = find_concept(concept or name)
        combo.setCurrentIndex(max(0, combo.findData(concept or (found.name if found else ""))))
        combo.currentIndexChanged.connect(lambda _i, v=value, cb=combo: self._concept(v, cb))
        self.setCellWidget(row, 2, combo)
        swatch = QTableWidgetItem(f"{rgb[0]}, {rgb[1]}, {rgb[2]}")
        swatch.setBackground(QColor(*rgb))
        self.setItem(row, 3, swatch)

    def _concept(self, value: int, combo: QComboBox) -> None:
        key = combo.currentData() or ""
        c = CONCEPTS.get(key)
        set_label_info(self._layer, value, concept=key, name=c.name if c else None)
        self.show_layer(self._layer)
        if self._on_change:
            self._on_change()

    def _item_changed(self, item: QTableWidgetItem) -> None:
        if self._filling or self._layer is None:
            return
        value = int(self.item(item.row(), 0).text())
        if item.column() == 1:
            set_label_info(self._layer, value, name=item.text().strip() or f"label {value}")
        elif item.column() == 3:
            parts = [p.strip() for p in item.text().replace(";", ",").split(",")]
            try:
                set_label_info(self._layer, value, color=tuple(int(p) for p in parts))
            except ValueError:  # not "R, G, B" in 0..255: the row shows the colour it had
                pass
        self.show_layer(self._layer)
        if self._on_change:
            self._on_change()
