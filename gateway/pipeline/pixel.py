"""Insert the open-tracking pixel into one HTML body: one 1x1 image just before ``</body>``."""

from __future__ import annotations

from gateway.pipeline.htmltok import insertion_point

#: Inline style that keeps the image invisible and out of the layout in every client
#: that honours styles; width/height attributes do the same for the ones that do not.
PIXEL_STYLE = "display:block;width:1px;height:1px;border:0;margin:0;padding:0;overflow:hidden"


def pixel_markup(url: str) -> str:
    """The ``<img>`` for a full open-tracking URL (``<base_url>/o/<token>``, ASCII, no quotes)."""
    safe = url.replace("&", "&amp;").replace('"', "&quot;").replace("<", "&lt;")
    return f'<img src="{safe}" width="1" height="1" alt="" border="0" style="{PIXEL_STYLE}">'


def insert_pixel(doc: str, url: str, at: int | None = None) -> str:
    """`doc` with the pixel before the last ``</body>`` (case-insensitive; comments, scripts
    and styles do not count), else before the last ``</html>``, else at the end of the
    document before any trailing whitespace. `at` is that place when the caller knows it
    already (the links stage does, for the text it returns)."""
    if at is None:
        at = insertion_point(doc)
    return doc[:at] + pixel_markup(url) + doc[at:]
