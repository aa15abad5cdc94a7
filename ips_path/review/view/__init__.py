"""``ipspath view``: the slides of a prediction folder with their attention, zoomable, in a browser.

:func:`serve` reads the folder (:mod:`ips_path.review.view.cohort`), makes Deep Zoom tiles of the slides
and of their attention on request (:mod:`ips_path.review.view.tiles`) and serves them with the viewer
page (:mod:`ips_path.review.view.server`, OpenSeadragon shipped in ``static/``).
"""

from ips_path.review.view.server import serve

__all__ = ["serve"]
