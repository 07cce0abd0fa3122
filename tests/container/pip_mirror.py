"""This machine's pip sources as one package index on loopback, for an image build, as a site mirror would serve
them: a build cannot read the host's folders, nor trust the CA of a TLS-intercepting proxy that the host trusts.

``pip config list`` names the sources: the upstream index (PyPI unless set), ``file://`` extra indexes and local
find-links folders (their files join the pages of their projects). ``http://127.0.0.1:PORT/simple/NAME/`` lists
the local files of NAME first and the upstream's other files after them (fetched by this process with the host's
certificates), so pip takes a wheel from the disk when it is there. ``build_args`` are the Dockerfile's documented
``PIP_*`` arguments for it.

    python tests/container/pip_mirror.py    # prints KEY=VALUE build arguments, then #ready; serves until Ctrl-C
"""

from __future__ import annotations

import html
import http.server
import os
import re
import shutil
import ssl
import subprocess
import sys
import threading
import urllib.request
from pathlib import Path
from urllib.parse import quote, unquote, urljoin, urlparse

# Always the same port when free: the PIP_* build arguments are part of the build cache's key, so another URL would
# rebuild the image's pip layers (torch's 6 GB one included).
PORT = 38741
ANCHOR = re.compile(r'<a\s[^>]*?href="([^"]+)"[^>]*>([^<]*)</a>', re.IGNORECASE)


def pip_config(python: str = sys.executable) -> dict[str, list[str]]:
    """``{"index-url": [...], "extra-index-url": [...], "find-links": [...], "cert": [...]}`` from ``pip config``."""
    out = subprocess.run([python, "-m", "pip", "config", "list"], capture_output=True, text=True, check=False).stdout
    found: dict[str, list[str]] = {k: [] for k in ("index-url", "extra-index-url", "find-links", "cert")}
    for line in out.splitlines():
        name, _, value = line.partition("=")
        key = name.rsplit(".", 1)[-1]
        for item in value.strip().strip("'\"").split() if key in found else ():
            if item not in found[key]:
                found[key].append(item)
    return found


def local_path(location: str) -> Path | None:
    """The folder behind a ``file://`` URL or a plain path; None for a remote URL."""
    if location.startswith("file://"):
        return Path(unquote(urlparse(location).path))
    return None if "://" in location else Path(location)


class _Handler(http.server.BaseHTTPRequestHandler):
    mirror: PipMirror

    def do_GET(self):  # noqa: N802 - http.server's name
        try:
            if self.path.startswith("/simple/"):
                self._send(self.mirror.project_page(self.path.split("/")[2]).encode(), "text/html")
            elif self.path.startswith("/local/"):
                self._send_file(self.mirror.allowed_file(unquote(self.path[len("/local") :].split("#")[0])))
            elif self.path.startswith("/remote/"):
                self._relay(self.mirror.remote_url(self.path))
            else:
                self.send_error(404)
        except (FileNotFoundError, PermissionError):
            self.send_error(404)
        except urllib.error.HTTPError as e:
            self.send_error(e.code)

    def _send(self, body: bytes, kind: str) -> None:
        self.send_response(200)
        self.send_header("Content-Type", kind)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _send_file(self, path: Path) -> None:
        with open(path, "rb") as f:
            self.send_response(200)
            self.send_header("Content-Type", "application/octet-stream")
            self.send_header("Content-Length", str(os.fstat(f.fileno()).st_size))
            self.end_headers()
            shutil.copyfileobj(f, self.wfile, 1 << 20)

    def _relay(self, url: str) -> None:
        with urllib.request.urlopen(url, context=self.mirror.tls, timeout=180) as r:
            self.send_response(200)
            self.send_header("Content-Type", r.headers.get("Content-Type", "application/octet-stream"))
            if r.headers.get("Content-Length"):
                self.send_header("Content-Length", r.headers["Content-Length"])
            self.end_headers()
            shutil.copyfileobj(r, self.wfile, 1 << 20)

    def log_message(self, format, *args):  # noqa: A002 - the base class's name
        pass


def default_index() -> str:
    """pip's own default index, where no configuration names one."""
    from pip._internal.models.index import PyPI

    return PyPI.simple_url


class PipMirror:
    """Serves the merged index on 127.0.0.1 in a thread (``with PipMirror() as m: m.docker_args()``)."""

    def __init__(self, config: dict[str, list[str]] | None = None, port: int = PORT):
        config = pip_config() if config is None else config
        self.upstream = (config["index-url"] or [default_index()])[0].rstrip("/") + "/"
        self.indexes = [p for p in map(local_path, config["extra-index-url"]) if p is not None and p.is_dir()]
        self.find_links = [p for p in map(local_path, config["find-links"]) if p is not None and p.is_dir()]
        self.tls = ssl.create_default_context(cafile=config["cert"][0] if config["cert"] else None)
        # An index's pages link to ../../files/...: its parent folder is served, and nothing else on the disk.
        self.allowed = tuple(os.path.realpath(p.parent) for p in self.indexes) + tuple(
            os.path.realpath(p) for p in self.find_links
        )
        handler = type("Handler", (_Handler,), {"mirror": self})
        try:
            self.server = http.server.ThreadingHTTPServer(("127.0.0.1", port), handler)
        except OSError:
            print(f"port {port} is taken: another one, so the pip layers are rebuilt", file=sys.stderr)
            self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.build_args = {"PIP_INDEX_URL": f"{self.url}/simple/", "PIP_TRUSTED_HOST": "127.0.0.1"}
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> PipMirror:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()

    def docker_args(self) -> list[str]:
        return [a for k, v in self.build_args.items() for a in ("--build-arg", f"{k}={v}")]

    def allowed_file(self, path: str) -> Path:
        real = os.path.realpath(path)
        if not any(real.startswith(a + os.sep) for a in self.allowed):
            raise PermissionError(path)
        if os.path.isdir(real):
            raise FileNotFoundError(path)
        return Path(real)

    def remote_url(self, path: str) -> str:
        scheme, host, rest = path[len("/remote/") :].split("/", 2)
        return f"{scheme}://{host}/{rest}"

    def _rewrite(self, anchor: str, href: str, base: str) -> tuple[str, str]:
        """The anchor with its link through this mirror, and the file name it points to."""
        url = urljoin(base, html.unescape(href))
        parts = urlparse(url)
        if parts.scheme == "file":
            local = f"{self.url}/local{quote(parts.path)}"
        else:
            local = f"{self.url}/remote/{parts.scheme}/{parts.netloc}{parts.path}"
        local += f"#{parts.fragment}" if parts.fragment else ""
        return anchor.replace(f'href="{href}"', f'href="{html.escape(local)}"'), unquote(parts.path.rsplit("/", 1)[-1])

    def project_page(self, project: str) -> str:
        anchors, names = [], set()
        for folder in self.find_links:
            for f in sorted(folder.iterdir()):
                if re.sub(r"[-_.]+", "-", f.name.split("-", 1)[0]).lower() == project and f.is_file():
                    names.add(f.name)
                    anchors.append(f'<a href="{self.url}/local{quote(str(f.resolve()))}">{html.escape(f.name)}</a>')
        for index in self.indexes:
            page = index / project / "index.html"
            if page.is_file():
                for m in ANCHOR.finditer(page.read_text()):
                    anchor, name = self._rewrite(m.group(0), m.group(1), page.resolve().as_uri())
                    if name not in names:
                        names.add(name)
                        anchors.append(anchor)
        request = urllib.request.Request(self.upstream + project + "/", headers={"Accept": "text/html"})
        try:
            with urllib.request.urlopen(request, context=self.tls, timeout=60) as r:
                base, text = r.geturl(), r.read().decode()
        except urllib.error.HTTPError as e:
            if e.code != 404 or not anchors:
                raise
            base, text = self.upstream, ""
        for m in ANCHOR.finditer(text):
            anchor, name = self._rewrite(m.group(0), m.group(1), base)
            if name not in names:
                names.add(name)
                anchors.append(anchor)
        return "<!DOCTYPE html><html><body>\n" + "<br/>\n".join(anchors) + "\n</body></html>\n"


if __name__ == "__main__":
    with PipMirror() as mirror:
        print("\n".join(f"{k}={v}" for k, v in mirror.build_args.items()), "#ready", sep="\n", flush=True)
        try:
            mirror.thread.join()
        except KeyboardInterrupt:
            pass
