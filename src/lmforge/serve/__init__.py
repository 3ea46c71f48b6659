"""`lmforge serve`: the HTTP API (OpenAI-compatible + attention/memory explorer) and the web page."""

from lmforge.serve.server import ServerThread, build_app, serve

__all__ = ["ServerThread", "build_app", "serve"]
