"""The app: GET / fetches web's page and a new visit count from store, by their
service names, and answers both."""

import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


def fetch(url: str, data: bytes | None = None) -> str:
    with urllib.request.urlopen(url, data=data, timeout=10) as answer:
        return answer.read().decode().strip()


class App(BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        try:
            body = f"{fetch('http://web/')} (visit {fetch('http://store:8001/visits', b'')})\n"
            status = 200
        except OSError as error:
            body, status = f"error: {error}\n", 502
        self.send_response(status)
        self.send_header("Content-Length", str(len(body.encode())))
        self.end_headers()
        self.wfile.write(body.encode())


print("app listening on 8000")
ThreadingHTTPServer(("", 8000), App).serve_forever()
