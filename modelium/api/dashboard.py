"""The web dashboard: one page at ``/`` and its static files under ``/dashboard/static/``.

The page is plain HTML, CSS and JavaScript shipped in the package (``modelium/api/static``): no
build step, nothing fetched from elsewhere. It reads the JSON routes the API already has
(``/models``, ``/status``, ``/health``) and follows the event log live over ``/ws/events``
(``GET /events`` when the WebSocket is not there); see ``static/app.js``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from quart import Blueprint, Response

STATIC = Path(__file__).parent / "static"
URL_PATH = "/dashboard/static"

# the app's own ``/static`` route (Quart adds one for the package) is left alone
dashboard = Blueprint("dashboard", __name__, static_folder=str(STATIC), static_url_path=URL_PATH)


@dashboard.get("/")
async def index() -> Response:
    """The web dashboard (an HTML page)"""
    body = (STATIC / "index.html").read_bytes()
    return Response(body, mimetype="text/html", headers={"Cache-Control": "no-cache"})


def add_dashboard_routes(app: Any) -> None:
    """Register the dashboard's routes on ``app``: ``/`` and ``/dashboard/static/...``."""
    app.register_blueprint(dashboard)
