"""Qt layout of the samed dock widget (no behaviour: :mod:`napari_samed._widget` wires it)."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

from qtpy.QtCore import Qt
from qtpy.QtWidgets import (
    QCheckBox,
    QComboBox,
    QFormLayout,
    QFrame,
    QGridLayout,
    QGroupBox,
    QHBoxLayout,
    QLabel,
    QLineEdit,
    QProgressBar,
    QPushButton,
    QScrollArea,
    QSpinBox,
    QVBoxLayout,
    QWidget,
)

__all__ = ["build_ui"]

_BUTTONS = (
    # attribute, text, shortcut hint, tooltip
    ("embed", "Embed volume", "Shift-E", "Compute image embeddings for every slice (cached)"),
    ("stop", "Stop", "Shift-X", "Stop embedding / propagation / automatic after this step"),
    (
        "accept",
        "Accept",
        "Shift-A",
        "Write the object into the labels layer under the active label",
    ),
    ("propagate", "Propagate", "Shift-P", "Carry the object through the volume"),
    ("clear_object", "Clear object", "Shift-C", "Drop the current prompts and preview"),
    (
        "delete_slice",
        "Delete on slice",
        "Shift-D",
        "Remove the active label from the current slice (and the object's prompts there)",
    ),
    ("automatic", "Automatic", "", "Segment all classes with an automatic adapter"),
    ("undo", "Undo", "Shift-U", "Undo the last prompt, propagation, clear or accept"),
    ("redo", "Redo", "Shift-R", "Redo"),
    ("export", "Export...", "", "Save labels: NIfTI on the source grid, or DICOM SEG (.dcm)"),
)


def build_ui(parent: QWidget) -> SimpleNamespace:
    """Create the widget's controls inside ``parent``; returns them by name."""
    from samed.registry import CT_WINDOWS, DEFAULT_MODEL, MODEL_KINDS, find_adapters

    ui = SimpleNamespace()
    # Everything sits in a vertical scroll area: a dock shorter than the controls' minimum
    # scrolls instead of squeezing group boxes below their minimum (in a 1400 x 1494 window
    # Qt cut the Segment box and the Train panel to 279 px and their rows overlapped).
    outer = QVBoxLayout(parent)
    outer.setContentsMargins(0, 0, 0, 0)
    ui.scroll = QScrollArea()
    ui.scroll.setWidgetResizable(True)
    ui.scroll.setHorizontalScrollBarPolicy(Qt.ScrollBarAlwaysOff)
    ui.scroll.setFrameShape(QFrame.NoFrame)
    ui.content = QWidget()
    ui.scroll.setWidget(ui.content)
    outer.addWidget(ui.scroll)
    root = QVBoxLayout(ui.content)

    model_box = QGroupBox("Model")
    form = QFormLayout(model_box)
    ui.model_combo = QComboBox()
    for kind, spec in MODEL_KINDS.items():
        ui.model_combo.addItem(kind, kind)
        ui.model_combo.setItemData(ui.model_combo.count() - 1, spec.description, 3)  # tooltip
    ui.model_combo.setCurrentText(DEFAULT_MODEL)
    ui.checkpoint_edit = QLineEdit()
    ui.checkpoint_edit.setPlaceholderText("checkpoint .pth (not needed for litemedsam)")
    ui.checkpoint_edit.setEnabled(not MODEL_KINDS[DEFAULT_MODEL].bundled)
    ui.adapter_combo = QComboBox()
    ui.adapter_combo.addItem("(none)", "")
    #: adapter name -> AdapterInfo, re-read by ``ui.refresh_adapters()`` (a newly trained one)
    ui.adapters = adapters = {a.name: a for a in find_adapters()}
    for a in adapters.values():
        ui.adapter_combo.addItem(f"{a.name} [{a.mode}]", a.name)
    default = next((a.name for a in adapters.values() if a.interactive_default), None)
    if default is not None:  # the click-aware adapter for box + click work (issue #17)
        ui.adapter_combo.setCurrentIndex(ui.adapter_combo.findData(default))
    form.addRow("Model", ui.model_combo)
    form.addRow("Checkpoint", ui.checkpoint_edit)
    form.addRow("Adapter", ui.adapter_combo)
    ui.model_state = QLabel("Model: not loaded (loads when an image is chosen)")
    ui.model_state.setWordWrap(True)
    ui.model_progress = QProgressBar()
    ui.model_progress.setRange(0, 0)  # indeterminate: loading has no steps to count
    ui.model_progress.setMaximumHeight(8)
    ui.model_progress.setTextVisible(False)
    ui.model_progress.setVisible(False)
    form.addRow(ui.model_state)
    form.addRow(ui.model_progress)
    root.addWidget(model_box)

    data_box = QGroupBox("Data")
    form = QFormLayout(data_box)
    ui.image_combo = QComboBox()
    ui.window_combo = QComboBox()
    ui.window_combo.addItem("auto (CT: abdomen)", "auto")
    for name, w in CT_WINDOWS.items():
        ui.window_combo.addItem(f"CT {name} (L {w.center:g} / W {w.width:g})", name)
    ui.window_combo.addItem("percentile 0.5-99.5 (MR)", "percentile")
    ui.window_combo.addItem("min-max per slice", "minmax")
    ui.labels_combo = QComboBox()
    ui.new_labels_btn = QPushButton("New")
    row = QHBoxLayout()
    row.addWidget(ui.labels_combo, 1)
    row.addWidget(ui.new_labels_btn)
    ui.label_spin = QSpinBox()
    ui.label_spin.setRange(1, 65535)
    ui.preserve_check = QCheckBox("Preserve other labels")
    ui.preserve_check.setChecked(True)
    ui.preserve_check.setToolTip("Accept never overwrites voxels that carry another label")
    form.addRow("Image", ui.image_combo)
    form.addRow("Window", ui.window_combo)
    form.addRow("Labels", row)
    form.addRow("Active label", ui.label_spin)
    form.addRow("", ui.preserve_check)
    ui.radiological_check = QCheckBox("Radiological view")
    ui.radiological_check.setChecked(True)
    ui.radiological_check.setToolTip(
        "Show axial slices as radiologists read them: anterior up, the patient's right on the "
        "screen's left, whatever the file's voxel order (the view only: data, prompts and exports "
        "are unchanged)"
    )
    form.addRow("", ui.radiological_check)
    root.addWidget(data_box)

    from ._labeltable import LabelTable

    table_box = QGroupBox("Label table (name, concept and colour go into DICOM SEG)")
    box = QVBoxLayout(table_box)
    ui.label_table = LabelTable(on_change=lambda: None)
    ui.label_table.setMinimumHeight(110)
    box.addWidget(ui.label_table)
    root.addWidget(table_box)

    act_box = QGroupBox("Segment")
    grid = QGridLayout(act_box)
    for i, (attr, text, key, tip) in enumerate(_BUTTONS):
        btn = QPushButton(f"{text} ({key})" if key else text)
        btn.setToolTip(tip)
        setattr(ui, f"{attr}_btn", btn)
        grid.addWidget(btn, i // 2, i % 2)
    ui.direction_combo = QComboBox()
    ui.direction_combo.addItems(["both", "forward", "backward"])
    n = len(_BUTTONS)
    grid.addWidget(QLabel("Propagate direction"), (n + 1) // 2, 0)
    grid.addWidget(ui.direction_combo, (n + 1) // 2, 1)
    ui.range_check = QCheckBox("Slices from")
    ui.range_check.setToolTip(
        "Limit propagation to these slices (inclusive): the object never goes beyond them"
    )
    ui.range_from = QSpinBox()
    ui.range_to = QSpinBox()
    for spin in (ui.range_from, ui.range_to):
        spin.setRange(0, 0)
        spin.setEnabled(False)
    ui.range_check.toggled.connect(ui.range_from.setEnabled)
    ui.range_check.toggled.connect(ui.range_to.setEnabled)
    row = QHBoxLayout()
    row.addWidget(ui.range_from)
    row.addWidget(QLabel("to"))
    row.addWidget(ui.range_to)
    grid.addWidget(ui.range_check, (n + 1) // 2 + 1, 0)
    grid.addLayout(row, (n + 1) // 2 + 1, 1)
    ui.repropagate_check = QCheckBox("Re-propagate after a click")
    ui.repropagate_check.setChecked(True)
    ui.repropagate_check.setToolTip(
        "A point added on a slice of a propagated object refines that slice and carries the "
        "change to the neighbouring slices, as far as it reaches and never over a prompted "
        "slice (a keyframe); click and re-propagation undo as one step"
    )
    grid.addWidget(ui.repropagate_check, (n + 1) // 2 + 2, 0, 1, 2)
    ui.keyframes = QLabel("Keyframes (prompted slices): none")
    ui.keyframes.setWordWrap(True)
    grid.addWidget(ui.keyframes, (n + 1) // 2 + 3, 0, 1, 2)
    ui.stop_btn.setEnabled(False)
    ui.undo_btn.setEnabled(False)
    ui.redo_btn.setEnabled(False)
    root.addWidget(act_box)

    ui.progress = QProgressBar()
    ui.progress.setVisible(False)
    ui.status = QLabel("Open a volume, then draw a box on 'samed boxes' or click points.")
    ui.status.setWordWrap(True)
    help_text = QLabel(
        "Prompts: rectangles in 'samed boxes', points in 'samed positive' / 'samed negative'. "
        "Shortcuts: " + ", ".join(f"{k} {t.lower()}" for _, t, k, _ in _BUTTONS if k)
    )
    help_text.setWordWrap(True)
    root.addWidget(ui.progress)
    root.addWidget(ui.status)
    root.addWidget(help_text)
    root.addStretch(1)

    def add_panel(panel: QWidget) -> None:
        """Add a panel (Train adapter, Uncertainty) below the controls, inside the scroll
        area and above the closing stretch."""
        root.insertWidget(root.count() - 1, panel)

    def model_bundled(kind: str) -> bool:
        spec = MODEL_KINDS.get(kind)
        return bool(spec and spec.bundled)

    def refresh_adapters() -> list[str]:
        """Re-read the adapter folders (:func:`samed.registry.find_adapters`): adapters new
        since the widget opened join the Adapter menu (the current choice stays), and label
        names and modes of every listed adapter are the ones on disk now (an adapter trained
        again under its name). Returns the names added to the menu."""
        found = {a.name: a for a in find_adapters()}
        adapters.update(found)
        combo = ui.adapter_combo
        have = {combo.itemData(i): i for i in range(combo.count())}
        added = []
        for name, a in found.items():
            if name in have:
                combo.setItemText(have[name], f"{a.name} [{a.mode}]")
            else:
                combo.addItem(f"{a.name} [{a.mode}]", a.name)
                added.append(name)
        return added

    def adapter_labels() -> dict[int, str]:
        """Foreground label value -> name of the adapter chosen in the menu ({} for none; the
        background 0 is left out); an adapter not read yet (installed after the widget opened)
        is looked up on disk first."""
        name = ui.adapter_combo.currentData() or ""
        if name and name not in adapters:
            refresh_adapters()
        info: Any = adapters.get(name)
        return {int(k): v for k, v in info.labels.items() if int(k)} if info is not None else {}

    ui.add_panel = add_panel
    ui.model_bundled = model_bundled
    ui.adapter_labels = adapter_labels
    ui.refresh_adapters = refresh_adapters
    return ui
