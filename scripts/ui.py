#!/usr/bin/env python
"""A page to look at the detections of a running service (TorchServe or the Ray front): drop an image or pick a
sample, choose the models and the threshold, see each model's boxes in its colour, the timings and the raw answer.

python scripts/ui.py [--service http://127.0.0.1:8080] [--port 8090]     (make ui; Ray: SERVICE=http://127.0.0.1:8000)

The page (ui/index.html) talks to this process, which serves it and passes its requests on to the service's
/predictions/<name> (no cross-origin request from the browser; a token, where the service wants one, stays here):
  GET  /api/describe                     the service's model set (the describe header), plus which service it is
  POST /api/predict?threshold=&models=   the body to the service; its status and JSON back unchanged
  GET  /api/samples, /api/samples/NAME   the README example and the sample photos
"""

from __future__ import annotations

import argparse
import json
import sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlsplit

import requests

ROOT = Path(__file__).resolve().parents[1]
PAGE = ROOT / "ui" / "index.html"
SAMPLES = {p.name: p for p in [ROOT / "docs" / "example.jpg", *sorted((ROOT / "load_tests" / "images").glob("*.jpg"))]}
MAX_BODY = 16 * 1024 * 1024  # the service's own max_request_size


def handler_for(service: str, name: str, headers: dict[str, str], timeout: float):
    class Page(BaseHTTPRequestHandler):
        def send(self, status: int, body: bytes, content_type: str = "application/json") -> None:
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.send_header("Cache-Control", "no-store")
            self.end_headers()
            self.wfile.write(body)

        def error(self, status: int, kind: str, message: str) -> None:
            self.send(status, json.dumps({"code": status, "type": kind, "message": message}).encode())

        def service(self, body: bytes, extra: dict[str, str]) -> None:
            """The service's answer, status and body as they came; unreachable: 502 in the project's words."""
            try:
                r = requests.put(
                    f"{service}/predictions/{name}", data=body, headers={**headers, **extra}, timeout=timeout
                )
            except requests.RequestException as exc:
                return self.error(502, "ServiceUnavailable", f"{service} did not answer ({type(exc).__name__})")
            self.send(r.status_code, r.content, r.headers.get("content-type", "application/json"))

        def do_GET(self) -> None:  # noqa: N802 (http.server's name)
            path = urlsplit(self.path).path
            if path in ("/", "/index.html"):
                return self.send(200, PAGE.read_bytes(), "text/html; charset=utf-8")
            if path == "/api/describe":
                try:
                    r = requests.put(
                        f"{service}/predictions/{name}", data=b"", headers={**headers, "describe": "True"}, timeout=30
                    )
                except requests.RequestException as exc:
                    return self.error(502, "ServiceUnavailable", f"{service} did not answer ({type(exc).__name__})")
                if r.status_code != 200:
                    return self.send(r.status_code, r.content)
                return self.send(200, json.dumps({**r.json(), "service": service}).encode())
            if path == "/api/samples":
                return self.send(200, json.dumps(list(SAMPLES)).encode())
            if path.startswith("/api/samples/") and unquote(path.rsplit("/", 1)[1]) in SAMPLES:
                return self.send(200, SAMPLES[unquote(path.rsplit("/", 1)[1])].read_bytes(), "image/jpeg")
            self.error(404, "ResourceNotFoundException", f"no page {path}")

        def do_POST(self) -> None:  # noqa: N802
            url = urlsplit(self.path)
            if url.path != "/api/predict":
                return self.error(404, "ResourceNotFoundException", f"no route {url.path}")
            size = int(self.headers.get("Content-Length") or 0)
            if size > MAX_BODY:
                return self.error(413, "RequestTooLarge", f"the image is larger than {MAX_BODY} bytes")
            query = {k: v[-1] for k, v in parse_qs(url.query).items()}
            extra = {f"X-{k.title()}": query[k] for k in ("threshold", "models") if query.get(k)}
            self.service(self.rfile.read(size), extra)

        def log_message(self, fmt: str, *args) -> None:
            sys.stderr.write(f"ui: {fmt % args}\n")

    return Page


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--service", default="http://127.0.0.1:8080", help="the service's inference URL (Ray: port 8000)")
    p.add_argument("--name", default="all", help="the endpoint: /predictions/<name>")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8090)
    p.add_argument("--token", help="the inference token, where the service wants one (TorchServe's key_file.json)")
    p.add_argument("--timeout", type=float, default=120)
    args = p.parse_args(argv)
    headers = {"Authorization": f"Bearer {args.token}"} if args.token else {}
    server = ThreadingHTTPServer(
        (args.host, args.port), handler_for(args.service.rstrip("/"), args.name, headers, args.timeout)
    )
    print(f"the page: http://{args.host}:{server.server_port}/  (service {args.service})", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
