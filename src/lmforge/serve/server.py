"""Start the server: from a run directory to a FastAPI app under uvicorn (foreground or in a thread)."""

from __future__ import annotations

import logging
import threading
import time
from pathlib import Path

import uvicorn
from fastapi import FastAPI

from lmforge.config import Recipe, ServeConfig, load_recipe
from lmforge.errors import LmforgeError
from lmforge.serve.app import create_app
from lmforge.serve.host import AnswerSettings, ModelHost

log = logging.getLogger("lmforge")


def run_recipe_for(run_dir: str | Path, overrides: dict[str, str] | None = None) -> Recipe:
    """The run's resolved recipe (for its [serve] and [generate] sections) with overrides applied."""
    config = Path(run_dir) / "config.toml"
    if not config.is_file():
        raise LmforgeError(f"{run_dir} is not an lmforge run directory (no config.toml)")
    return load_recipe(config, overrides)


def build_app(
    run_dir: str | Path,
    checkpoint: str | None = None,
    serve_cfg: ServeConfig | None = None,
    overrides: dict[str, str] | None = None,
    device: str = "cpu",
) -> FastAPI:
    recipe = run_recipe_for(run_dir, overrides)
    cfg = serve_cfg or recipe.serve
    host = ModelHost(
        run_dir, checkpoint or cfg.checkpoint, device=device, batch_rows=cfg.max_concurrent if cfg.batching else 0
    )
    return create_app(host, cfg, recipe.generate, AnswerSettings.of(recipe))


def serve(
    run_dir: str | Path,
    checkpoint: str | None = None,
    host: str | None = None,
    port: int | None = None,
    overrides: dict[str, str] | None = None,
    device: str = "cpu",
) -> None:
    """Serve a run in the foreground until Ctrl-C."""
    cfg = run_recipe_for(run_dir, overrides).serve
    cfg.host = host or cfg.host
    cfg.port = cfg.port if port is None else port
    app = build_app(run_dir, checkpoint, cfg, overrides, device)
    if cfg.host not in ("127.0.0.1", "localhost", "::1"):
        log.warning("serving on %s: reachable from other machines, and the API has no authentication", cfg.host)
    log.info(
        "serving %s (checkpoint %s) at http://%s:%d/", app.state.host.name, app.state.host.active, cfg.host, cfg.port
    )
    try:
        uvicorn.run(app, host=cfg.host, port=cfg.port, log_level="warning", timeout_graceful_shutdown=2)
    except SystemExit as exc:  # uvicorn exits when it cannot bind; say so in one line
        raise LmforgeError(f"could not serve on {cfg.host}:{cfg.port} (port in use?)") from exc


class ServerThread:
    """A real uvicorn server on 127.0.0.1 (a free port by default) in a background thread.

    with ServerThread(app) as url: ...   # for tests and benchmarks
    """

    def __init__(self, app: FastAPI, host: str = "127.0.0.1", port: int = 0):
        self.server = uvicorn.Server(
            uvicorn.Config(app, host=host, port=port, log_level="warning", timeout_graceful_shutdown=1)
        )
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.url = ""

    def __enter__(self) -> str:
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("uvicorn did not start")
            time.sleep(0.02)
        host, port = self.server.servers[0].sockets[0].getsockname()[:2]
        self.url = f"http://{host}:{port}"
        return self.url

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)
