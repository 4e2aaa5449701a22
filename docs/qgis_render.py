"""The half of docs/screenshots.py that needs Debian's Python (/usr/bin/python3: PyQGIS 3.22 and Pillow).

    qgis_render.py layout PROJECT CHECKPOINT OUT.png  - the project as it opens, in a print layout: a title line,
                                                        the map and the legend of its shown layers
    qgis_render.py shrink IN.png OUT.png              - a screenshot as a small PNG (256 colours)

Run headless: QT_QPA_PLATFORM=offscreen.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

from PIL import Image
from qgis.core import (
    Qgis,
    QgsApplication,
    QgsLayerTree,
    QgsLayerTreeGroup,
    QgsLayoutExporter,
    QgsLayoutItemLabel,
    QgsLayoutItemLegend,
    QgsLayoutItemMap,
    QgsLayoutPoint,
    QgsLayoutSize,
    QgsPrintLayout,
    QgsProject,
    QgsRectangle,
    QgsUnitTypes,
)
from qgis.PyQt.QtGui import QFont

MM = QgsUnitTypes.LayoutMillimeters
MARGIN_MM = 5.0
TITLE_MM = 12.0
MAP_WIDTH_MM = 150.0
TITLE_POINTS = 11
DPI = 100


def layout_png(project_path: str, checkpoint: str, out: str) -> None:
    project = QgsProject.instance()
    if not project.read(project_path):
        raise SystemExit(f"error: QGIS cannot read {project_path}: {project.error()}")
    layout = QgsPrintLayout(project)
    layout.initializeDefaults()
    title = _title(
        layout,
        f"{Path(project_path).name} in QGIS {_qgis_version()} as it opens: {project.title()} · checkpoint {checkpoint}",
    )
    map_item = _map(layout, project)
    legend = _legend(layout, map_item)
    exporter = QgsLayoutExporter(layout)
    exporter.renderPageToImage(0)  # QGIS sizes a legend only once it has drawn it
    legend.adjustBoxSize()
    items = (title, map_item, legend)
    width = max(item.pos().x() + item.sizeWithUnits().width() for item in items) + MARGIN_MM
    height = max(item.pos().y() + item.sizeWithUnits().height() for item in items) + MARGIN_MM
    layout.pageCollection().page(0).setPageSize(QgsLayoutSize(width, height, MM))
    settings = QgsLayoutExporter.ImageExportSettings()
    settings.dpi = DPI
    settings.exportMetadata = False
    with tempfile.TemporaryDirectory() as folder:
        raw = str(Path(folder) / "layout.png")
        if exporter.exportToImage(raw, settings) != QgsLayoutExporter.Success:
            raise SystemExit(f"error: QGIS could not export the layout of {project_path}: {exporter.errorMessage()}")
        shrink(raw, out)


def _qgis_version() -> str:
    return ".".join(Qgis.QGIS_VERSION.split(".")[:2])


def _title(layout: QgsPrintLayout, text: str) -> QgsLayoutItemLabel:
    label = QgsLayoutItemLabel(layout)
    label.setText(text)
    label.setFont(QFont("DejaVu Sans", TITLE_POINTS))
    label.adjustSizeToText()
    label.attemptMove(QgsLayoutPoint(MARGIN_MM, MARGIN_MM, MM))
    layout.addLayoutItem(label)
    return label


def _map(layout: QgsPrintLayout, project: QgsProject) -> QgsLayoutItemMap:
    """The project's shown layers over its first view, at MAP_WIDTH_MM wide."""
    extent = QgsRectangle(project.viewSettings().defaultViewExtent())
    item = QgsLayoutItemMap(layout)
    item.attemptMove(QgsLayoutPoint(MARGIN_MM, MARGIN_MM + TITLE_MM, MM))
    item.attemptResize(QgsLayoutSize(MAP_WIDTH_MM, MAP_WIDTH_MM * extent.height() / extent.width(), MM))
    item.setCrs(project.crs())
    item.setExtent(extent)
    layout.addLayoutItem(item)
    return item


def _legend(layout: QgsPrintLayout, map_item: QgsLayoutItemMap) -> QgsLayoutItemLegend:
    """The legend of the layers the project shows, right of the map."""
    legend = QgsLayoutItemLegend(layout)
    legend.setTitle("")
    legend.setLinkedMap(map_item)
    legend.setAutoUpdateModel(False)
    _keep_shown(legend.model().rootGroup())
    legend.setResizeToContents(True)
    legend.attemptMove(QgsLayoutPoint(2 * MARGIN_MM + MAP_WIDTH_MM, MARGIN_MM + TITLE_MM, MM))
    layout.addLayoutItem(legend)
    return legend


def _keep_shown(group: QgsLayerTreeGroup) -> None:
    """Drop the hidden layers from a legend's tree, and the groups left empty."""
    for child in list(group.children()):
        if QgsLayerTree.isGroup(child):
            _keep_shown(child)
            if not child.children():
                group.removeChildNode(child)
        elif not child.isVisible():
            group.removeChildNode(child)


def shrink(raw: str, out: str) -> None:
    # Octree keeps the legend's small swatches in their own colours (median cut merges them into the imagery's).
    Image.open(raw).convert("RGB").quantize(256, method=Image.Quantize.FASTOCTREE).save(out, optimize=True)


def main(argv: list[str]) -> None:
    command, *args = argv
    if command == "shrink":
        shrink(*args)
        return
    app = QgsApplication([], False)
    app.initQgis()
    try:
        layout_png(*args)
    finally:
        app.exitQgis()


if __name__ == "__main__":
    main(sys.argv[1:])
