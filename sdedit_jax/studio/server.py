"""The studio's HTTP server: the page's files and a small JSON API.

Routes (JSON in and out; images travel as base64 PNG):

* ``GET /`` and ``GET /static/<file>``: the page (``static/``, no asset from elsewhere).
* ``GET /api/info``: the model's size and channels, presets, limits.
* ``POST /api/edit`` ``{guide, mask?, t0, repeats, seed, samples, preset, prompt,
  negative_prompt, guidance_scale}`` (the text fields: text models only):
  queues the previews (202 with a job id; 200 when every one is cached), 503 when busy.
* ``GET /api/jobs/<id>?wait=<s>``: progress and finished results (waits up to ``s``).
* ``POST /api/save`` (the fields of ``/api/edit`` but ``samples``): writes the
  dataset row of that preview and returns the job command that edits it.
* ``POST /api/composite`` ``{target, source, box, at, scale, dilate}``: the guide and
  mask of ``python -m sdedit_jax.composite`` (:mod:`.composites`).
* ``GET /api/dataset``, ``GET /api/dataset/guide?name=<file>``: the dataset's guides.

With a token every route needs it (header ``X-Studio-Token`` or ``?token=``).
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import functools
import hmac
import http.server
import json
import os
import urllib.parse
from typing import Any

from sdedit_jax.data import guide_inputs
from sdedit_jax.jobs.checks import DEFAULT_GUIDANCE_SCALE
from sdedit_jax.studio import composites, dataset, presets, previews

STATIC = os.path.join(os.path.dirname(os.path.abspath(__file__)), "static")
CONTENT_TYPES = {".html": "text/html", ".js": "text/javascript", ".css": "text/css"}
LOOPBACK = ("127.0.0.1", "localhost", "::1")


@dataclasses.dataclass
class Studio:
    """What the request handler serves: the previewer, the decoding checks, the dataset."""

    previewer: previews.Previewer
    model_dir: str
    dataset_dir: str | None = None
    token: str | None = None
    max_upload_bytes: int = 8 << 20
    max_samples: int = 8
    max_repeats: int = 4

    @functools.cached_property
    def decode_config(self) -> guide_inputs.GuideInputConfig:
        """The job's decoding checks at the model's size (uploads are never resized)."""
        model = self.previewer.model
        return guide_inputs.GuideInputConfig(
            source="folder",
            path="upload",
            image_size=(model.image_size, model.image_size),
            channels=model.num_channels,
            time_domain=(model.sde.eps, model.sde.T),
            max_pixels=4 * model.image_size**2,
        )

    def info(self) -> dict:
        model = self.previewer.model
        return {
            "image_size": model.image_size,
            "channels": model.num_channels,
            "presets": list(presets.PRESETS),
            "default_preset": presets.DEFAULT_PRESET,
            "t0_range": [model.sde.eps, model.sde.T],
            "max_samples": self.max_samples,
            "max_repeats": self.max_repeats,
            "max_upload_bytes": self.max_upload_bytes,
            "takes_text": self.previewer.takes_text,
            "default_guidance_scale": DEFAULT_GUIDANCE_SCALE,
            "dataset": self.dataset_dir,
        }

    def rows(self, body: dict) -> tuple[list[previews.Row], bytes, bytes | None]:
        """The request's preview rows and its guide and mask PNGs (checked)."""
        model = self.previewer.model
        settings = previews.parse_settings(
            body,
            (model.sde.eps, model.sde.T),
            max_samples=self.max_samples,
            max_repeats=self.max_repeats,
            takes_text=self.previewer.takes_text,
        )
        guide_png = previews.check_png(_image_field(body, "guide"), "guide")
        mask_png = _image_field(body, "mask", required=False)
        mask_png = previews.check_png(mask_png, "mask") if mask_png else None
        guide, mask = previews.decode_images(self.decode_config, guide_png, mask_png)
        return previews.make_rows(guide_png, mask_png, guide, mask, settings), guide_png, mask_png

    def save(self, body: dict) -> dict:
        if not self.dataset_dir:
            raise ValueError("dataset: the studio was started without --dataset")
        rows, guide_png, mask_png = self.rows({**body, "samples": 1})
        manifest = dataset.save(self.dataset_dir, rows[0], guide_png, mask_png)
        command = dataset.job_command(
            manifest,
            self.model_dir,
            rows[0].settings.preset,
            rows[0].settings.repeats,
            self.previewer.per_device_batch,
        )
        return {
            "id": rows[0].id,
            "manifest": manifest,
            "command": command,
            "command_line": dataset.shell_line(command),
        }

    def dataset_guides(self) -> list[str]:
        folder = os.path.join(self.dataset_dir or "", dataset.GUIDES)
        if not self.dataset_dir or not os.path.isdir(folder):
            return []
        return sorted(n for n in os.listdir(folder) if n.endswith(".png"))


def _image_field(body: dict, name: str, *, required: bool = True) -> bytes:
    """A base64 PNG (plain or a ``data:`` URL) from the request's ``name`` field."""
    value = body.get(name)
    if value in (None, "") and not required:
        return b""
    if not isinstance(value, str):
        raise ValueError(f"{name}: expected a base64 PNG string, got {type(value).__name__}")
    try:
        return base64.b64decode(value.split(",", 1)[-1], validate=True)
    except binascii.Error:
        raise ValueError(f"{name}: not valid base64") from None


def composite_reply(body: dict) -> dict:
    guide, mask = composites.composite(
        _image_field(body, "target"),
        _image_field(body, "source"),
        body.get("box"),
        body.get("at"),
        body.get("scale", 1.0),
        body.get("dilate", 0),
    )
    return {"guide": base64.b64encode(guide).decode(), "mask": base64.b64encode(mask).decode()}


def job_reply(job: previews.Job) -> dict:
    results = [
        {
            "id": row.id,
            "seed": row.seed,
            "png": base64.b64encode(png).decode() if png is not None else None,
        }
        for row, png in zip(job.rows, job.results, strict=True)
    ]
    status = "failed" if job.error else "done" if job.done.is_set() else "running"
    return {
        "job": job.id,
        "status": status,
        "error": job.error,
        "finished": job.finished_rows,
        "total": len(job.rows),
        "results": results,
    }


class Handler(http.server.BaseHTTPRequestHandler):
    """Routes requests to the server's :class:`Studio` (``self.server.studio``)."""

    server_version = "sdedit-studio"

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 (the base's name)
        """Quiet: previews are polled several times a second."""

    @property
    def studio(self) -> Studio:
        return self.server.studio  # type: ignore[attr-defined]

    def _send(self, status: int, body: bytes, content_type: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.end_headers()
        self.wfile.write(body)

    def _json(self, status: int, value: dict) -> None:
        self._send(status, json.dumps(value).encode(), "application/json")

    def _error(self, status: int, reason: str) -> None:
        self._json(status, {"error": reason})

    def _authorised(self, query: dict) -> bool:
        token = self.studio.token
        if token is None:
            return True
        given = self.headers.get("X-Studio-Token") or query.get("token", [""])[0]
        return hmac.compare_digest(given.encode(), token.encode())

    def _route(self) -> tuple[str, dict] | None:
        url = urllib.parse.urlsplit(self.path)
        query = urllib.parse.parse_qs(url.query)
        if not self._authorised(query):
            self._error(403, "token: missing or wrong (start URL printed by the studio)")
            return None
        return url.path, query

    def do_GET(self) -> None:  # noqa: N802 (http.server's name)
        routed = self._route()
        if routed is None:
            return
        path, query = routed
        if path == "/":
            path = "/static/index.html"
        if path.startswith("/static/"):
            self._static(path.removeprefix("/static/"))
        elif path == "/api/info":
            self._json(200, self.studio.info())
        elif path == "/api/dataset":
            self._json(200, {"guides": self.studio.dataset_guides()})
        elif path == "/api/dataset/guide":
            self._dataset_guide(query.get("name", [""])[0])
        elif path.startswith("/api/jobs/"):
            self._job(path.removeprefix("/api/jobs/"), query)
        else:
            self._error(404, f"path: no route {path!r}")

    def do_POST(self) -> None:  # noqa: N802 (http.server's name)
        routed = self._route()
        if routed is None:
            return
        path, _ = routed
        body = self._body()
        if body is None:
            return
        try:
            if path == "/api/edit":
                job = self.studio.previewer.submit(self.studio.rows(body)[0])
                self._json(200 if job.done.is_set() else 202, job_reply(job))
            elif path == "/api/save":
                self._json(200, self.studio.save(body))
            elif path == "/api/composite":
                self._json(200, composite_reply(body))
            else:
                self._error(404, f"path: no route {path!r}")
        except previews.Busy as e:
            self._error(503, f"busy: {e}")
        except ValueError as e:
            self._error(400, str(e))

    def _body(self) -> dict | None:
        """The request's JSON object, refused (413) past the upload limit before it is read."""
        try:
            length = int(self.headers.get("Content-Length", ""))
        except ValueError:
            self._error(411, "Content-Length: required")
            return None
        limit = self.studio.max_upload_bytes
        if length > limit:
            self.close_connection = True
            self._error(413, f"upload: {length} bytes exceeds the limit of {limit} bytes")
            return None
        try:
            body = json.loads(self.rfile.read(length))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            self._error(400, f"body: not JSON ({e})")
            return None
        if not isinstance(body, dict):
            self._error(400, f"body: expected a JSON object, got {type(body).__name__}")
            return None
        return body

    def _static(self, name: str) -> None:
        extension = os.path.splitext(name)[1]
        path = os.path.join(STATIC, name)
        if "/" in name or extension not in CONTENT_TYPES or not os.path.isfile(path):
            self._error(404, f"static: no file {name!r}")
            return
        with open(path, "rb") as f:
            self._send(200, f.read(), CONTENT_TYPES[extension] + "; charset=utf-8")

    def _dataset_guide(self, name: str) -> None:
        if name not in self.studio.dataset_guides():
            self._error(404, f"name: no guide {name!r} in the dataset")
            return
        path = os.path.join(self.studio.dataset_dir, dataset.GUIDES, name)
        with open(path, "rb") as f:
            self._send(200, f.read(), "image/png")

    def _job(self, job_id: str, query: dict) -> None:
        job = self.studio.previewer.job(job_id)
        if job is None:
            self._error(404, f"job: no job {job_id!r}")
            return
        try:
            wait = min(float(query.get("wait", ["0"])[0]), 60.0)
        except ValueError:
            self._error(400, f"wait: expected seconds, got {query['wait'][0]!r}")
            return
        job.done.wait(max(wait, 0.0))
        self._json(200, job_reply(job))


class StudioServer(http.server.ThreadingHTTPServer):
    """A threading HTTP server carrying its :class:`Studio`."""

    daemon_threads = True

    def __init__(self, address: tuple[str, int], studio: Studio):
        if address[0] not in LOOPBACK and not studio.token:
            raise ValueError(
                f"host: {address[0]!r} is not loopback; pass --token to serve other machines"
            )
        super().__init__(address, Handler)
        self.studio = studio

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        query = f"?token={urllib.parse.quote(self.studio.token)}" if self.studio.token else ""
        return f"http://{host}:{port}/{query}"
