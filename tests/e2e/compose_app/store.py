"""The store: POST /visits adds one to the count kept in /data/visits (a named volume)
and answers the new count."""

from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

COUNT = Path("/data/visits")


class Store(BaseHTTPRequestHandler):
    def do_POST(self) -> None:
        count = int(COUNT.read_text()) + 1 if COUNT.exists() else 1
        COUNT.write_text(str(count))
        body = str(count).encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


print("store listening on 8001")
ThreadingHTTPServer(("", 8001), Store).serve_forever()
