"""The UI's FastAPI application: server-rendered pages (Jinja2) plus a few JSON endpoints the pages poll.

Pages: ``/`` runs list, ``/run/<id>`` a run (live curves, metrics, report, samples, try it), ``/compare?run=a
&run=b`` curves overlaid and configs side by side, ``/new`` the generated form, ``/tables`` and
``/table/<id>`` the compare and forgetting tables. JSON: ``/api/runs``, ``/api/metrics/<id>?offset=N``
(new metrics records since byte N, status, progress and log tail), ``POST /api/try/<id>`` (load a run into
the embedded server), and the server itself under ``/serve``. Static files (uPlot, the page script) are
served from the package: nothing is fetched from the network.

Safety: every run id is resolved inside the runs folder (`RunsFolder.resolve`, 404 otherwise); a run is
started as an argument list (`JobManager`); forms carry a per-process token and JSON posts need a custom
header, so another web page cannot make the browser start or stop runs; only loopback host names are
accepted unless the UI is bound elsewhere on purpose.
"""

from __future__ import annotations

import re
import secrets
import shlex
import threading
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, quote

from fastapi import FastAPI, HTTPException, Request
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, RedirectResponse, Response
from fastapi.staticfiles import StaticFiles
from fastapi.templating import Jinja2Templates
from starlette.concurrency import run_in_threadpool

from tuneforge.config import load_config, to_yaml
from tuneforge.config.schema import RunConfig
from tuneforge.errors import ConfigError, TuneforgeError
from tuneforge.ui import form as formlib
from tuneforge.ui.jobs import JobManager
from tuneforge.ui.runs import (
    PathRefused,
    RunsFolder,
    config_diff,
    read_config,
    read_json,
    read_metrics_from,
    summarize,
)

__all__ = ["LOOPBACK", "create_app"]

HERE = Path(__file__).parent
LOOPBACK = ["127.0.0.1", "localhost", "::1", "[::1]"]
_FILE_TYPES = {".png", ".md", ".json", ".yaml", ".csv", ".jsonl", ".txt"}


def _markdown(text: str, base: str) -> str:
    """Markdown as HTML (raw HTML in it is escaped); relative images point at ``/files/<base>/``."""
    from markdown_it import MarkdownIt

    html = MarkdownIt("commonmark", {"html": False}).enable("table").render(text)
    return re.sub(r'src="(?!/|[a-z]+:)([^"]+)"', lambda m: f'src="/files/{quote(base)}/{m.group(1)}"', html)


def _recipes(cwd: Path) -> dict[str, Path]:
    """Recipe files the picker offers: ``recipes/*.yaml`` under the working directory."""
    folder = cwd / "recipes"
    return {p.relative_to(cwd).as_posix(): p for p in sorted(folder.glob("*.yaml"))} if folder.is_dir() else {}


def _recipe_note(path: Path) -> str:
    lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
    return " ".join(ln.lstrip("# ").strip() for ln in lines[:1] if ln.startswith("#"))


def create_app(runs: str | Path = "runs", *, cwd: str | Path | None = None, device: str = "auto",
               allowed_hosts: list[str] | None = None, try_it: bool = True) -> FastAPI:
    """The UI over the runs folder ``runs``; training children start in ``cwd`` (default: the current one)."""
    cwd = Path(cwd or Path.cwd()).resolve()
    runs_path = Path(runs) if Path(runs).is_absolute() else cwd / runs
    runs_path.mkdir(parents=True, exist_ok=True)
    folder = RunsFolder(runs_path)
    jobs = JobManager(folder, cwd)
    token = secrets.token_urlsafe(16)
    tryit = _LazyTryIt(device) if try_it else None  # torch and the server load on first use: a fast start

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        yield
        if tryit is not None:
            tryit.close()

    app = FastAPI(title="tuneforge ui", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.folder, app.state.jobs, app.state.token, app.state.tryit = folder, jobs, token, tryit
    templates = Jinja2Templates(directory=str(HERE / "templates"))
    templates.env.globals.update(token=token, quote=quote)
    app.mount("/static", StaticFiles(directory=str(HERE / "static")), name="static")
    if tryit is not None:
        app.mount("/serve", tryit)
    if allowed_hosts != ["*"]:
        from starlette.middleware.trustedhost import TrustedHostMiddleware

        app.add_middleware(TrustedHostMiddleware, allowed_hosts=allowed_hosts or LOOPBACK)

    def run_dir(run_id: str) -> Path:
        try:
            path = folder.resolve(run_id)
        except PathRefused as e:
            raise HTTPException(404, str(e)) from None
        if not (path / "config.yaml").is_file() and jobs.record(run_id) is None:  # launched, not yet started
            raise HTTPException(404, f"no run at {run_id!r}")
        return path

    def page(request: Request, name: str, status: int = 200, **ctx: Any) -> HTMLResponse:
        return templates.TemplateResponse(request, name, {"runs_root": str(folder.root), **ctx}, status_code=status)

    async def posted(request: Request) -> dict[str, str]:
        body = (await request.body()).decode("utf-8", errors="replace")
        data = dict(parse_qsl(body, keep_blank_values=True))
        if not secrets.compare_digest(data.pop("_token", ""), token):
            raise HTTPException(403, "missing or stale form token: reload the page")
        return data

    def check_header(request: Request) -> None:
        if request.headers.get("x-tuneforge-ui") != "1":
            raise HTTPException(403, "send the X-Tuneforge-UI: 1 header")

    # ------------------------------------------------------------------------------------------ runs
    def summaries() -> list[Any]:
        dirs = folder.runs()
        known = {folder.rel(d) for d in dirs}
        starting = []  # launched, config.yaml not written yet
        for r in jobs.runs():
            if r not in known:
                try:
                    starting.append(folder.resolve(r))
                except PathRefused:
                    continue
        return [summarize_one(d) for d in [*starting, *dirs]]

    def summarize_one(d: Path) -> Any:
        rid = folder.rel(d)
        job = jobs.record(rid)
        planned = _planned(job, cwd) if job is not None and not (d / "config.yaml").is_file() else None
        return summarize(folder, d, job, planned)

    @app.get("/", response_class=HTMLResponse)
    async def runs_list(request: Request) -> HTMLResponse:
        return page(request, "runs.html", runs=summaries())

    @app.get("/api/runs")
    async def api_runs() -> list[dict[str, Any]]:
        return [{k: v for k, v in vars(s).items() if k != "job"} | {"wall": s.wall} for s in summaries()]

    @app.get("/run/{run_id:path}", response_class=HTMLResponse)
    async def run_page(request: Request, run_id: str) -> HTMLResponse:
        d = run_dir(run_id)
        summary = summarize_one(d)
        final = read_json(d / "metrics.json") or {}
        report = (d / "report.md").read_text(encoding="utf-8", errors="replace") if (d / "report.md").is_file() else ""
        splits = {name: {k: v for k, v in block.items() if isinstance(v, (int, float))}
                  for name, block in (final.get("splits") or {}).items() if isinstance(block, dict)}
        samples = (final.get("samples") or {}).get("rows") or []
        config_text = (d / "config.yaml").read_text(encoding="utf-8", errors="replace") if (d / "config.yaml").is_file() \
            else "(written when training starts)"
        return page(request, "run.html", run=summary, splits=splits, train=final.get("train") or {},
                    samples=samples, report=_markdown(report, run_id) if report else "", config=config_text,
                    plots=sorted(p.name for p in (d / "plots").glob("*.png")) if (d / "plots").is_dir() else [],
                    log=jobs.log(run_id), try_it=tryit is not None,
                    resumable=(d / "checkpoints").is_dir() and any((d / "checkpoints").iterdir()))

    @app.get("/api/metrics/{run_id:path}")
    async def api_metrics(run_id: str, offset: int = 0) -> dict[str, Any]:
        d = run_dir(run_id)
        records, nxt, reset = read_metrics_from(d, max(0, offset))
        s = summarize_one(d)
        return {"records": records, "offset": nxt, "reset": reset, "status": s.status, "step": s.step,
                "total": jobs.total_steps(run_id), "log": jobs.log(run_id), "wall": s.wall}

    @app.get("/compare", response_class=HTMLResponse)
    async def compare_runs(request: Request) -> HTMLResponse:
        ids = [v for k, v in request.query_params.multi_items() if k == "run"]
        for rid in ids:
            run_dir(rid)
        rows = config_diff({rid: read_config(run_dir(rid)) for rid in ids})
        return page(request, "compare.html", ids=ids, rows=rows)

    @app.get("/files/{path:path}")
    async def files(path: str) -> FileResponse:
        try:
            p = folder.resolve(path)
        except PathRefused as e:
            raise HTTPException(404, str(e)) from None
        if not p.is_file() or p.suffix not in _FILE_TYPES:
            raise HTTPException(404, "no such file")
        return FileResponse(p)

    # ------------------------------------------------------------------------------------------ jobs
    @app.post("/api/stop/{run_id:path}")
    async def stop(request: Request, run_id: str) -> Response:
        await posted(request)
        run_dir(run_id)
        if not jobs.stop(run_id):
            raise HTTPException(409, f"run {run_id} is not running (from this UI)")
        return RedirectResponse(f"/run/{quote(run_id)}", status_code=303)

    @app.post("/api/resume/{run_id:path}")
    async def resume(request: Request, run_id: str) -> Response:
        await posted(request)
        d = run_dir(run_id)
        args = ["train", str((d / "config.yaml").relative_to(cwd) if d.is_relative_to(cwd) else d / "config.yaml")]
        out = read_config(d).get("output_dir")
        if out is None or (cwd / str(out)).resolve() != d:
            args.append(f"output_dir={d}")
        try:
            jobs.launch(run_id, [*args, "--resume"])
        except RuntimeError as e:
            raise HTTPException(409, str(e)) from None
        return RedirectResponse(f"/run/{quote(run_id)}", status_code=303)

    # ------------------------------------------------------------------------------------------ new run
    def recipe_path(name: str | None) -> Path | None:
        if not name:
            return None
        if name.startswith("run:"):  # start from another run's config.yaml
            return run_dir(name[4:]) / "config.yaml"
        found = _recipes(cwd).get(name)
        if found is None:
            raise HTTPException(404, f"no recipe {name!r} under {cwd / 'recipes'}")
        return found

    def form_page(request: Request, recipe: str | None, values: dict[str, str] | None = None,
                  errors: dict[str, str] | None = None, general: list[str] | None = None,
                  status: int = 200) -> HTMLResponse:
        sections = formlib.build_form()
        base = _base_config(recipe_path(recipe), general_out := [])
        values = {**formlib.form_values(sections, base), **(values or {})}
        recipes = {name: _recipe_note(p) for name, p in _recipes(cwd).items()}
        if recipe and recipe.startswith("run:"):
            recipes[recipe] = f"the config of run {recipe[4:]} (give it a new output_dir)"
        from tuneforge.models import list_models

        return page(request, "new.html", status, sections=sections, values=values, errors=errors or {},
                    general=[*general_out, *(general or [])], recipes=recipes, recipe=recipe or "",
                    models=[m.name for m in list_models()])

    @app.get("/new", response_class=HTMLResponse)
    async def new_form(request: Request, recipe: str | None = None) -> HTMLResponse:
        return form_page(request, recipe)

    @app.post("/new", response_class=HTMLResponse)
    async def new_run(request: Request) -> Response:
        data = await posted(request)
        recipe = data.pop("_recipe", "") or None
        path = recipe_path(recipe)
        sections = formlib.build_form()
        args, cfg_or_err = plan_run(sections, data, path)
        if isinstance(cfg_or_err, ConfigError):
            per, general = formlib.field_errors(sections, data, cfg_or_err)
            return form_page(request, recipe, data, per, general, status=422)
        run_id = folder.rel(_out_dir(cfg_or_err, cwd))
        try:
            jobs.launch(run_id, args)
        except RuntimeError as e:
            return form_page(request, recipe, data, {}, [str(e)], status=409)
        return RedirectResponse(f"/run/{quote(run_id)}", status_code=303)

    def plan_run(sections: list[Any], data: dict[str, str], recipe: Path | None) -> tuple[list[str], Any]:
        """(the `tuneforge train` arguments, the validated config) or ([], the ConfigError)."""
        recipe_arg = [] if recipe is None else [str(recipe.relative_to(cwd) if recipe.is_relative_to(cwd) else recipe)]
        try:
            base = load_config(recipe)
            overrides = formlib.form_overrides(sections, data, base)
            if not data.get("output_dir") and base.output_dir is None:
                task = data.get("task.name") or base.task.name
                default = (folder.root / f"{task}-{time.strftime('%Y%m%d-%H%M%S')}")
                overrides.append(f"output_dir={default.relative_to(cwd) if default.is_relative_to(cwd) else default}")
            cfg = load_config(recipe, overrides)
            _check_out_dir(cfg, folder, cwd)
        except ConfigError as e:
            return [], e
        return ["train", *recipe_arg, *overrides], cfg

    @app.post("/api/validate")
    async def validate(request: Request) -> JSONResponse:
        """The form's values checked as `/new` would (no run starts): errors per input, or the command."""
        data = await posted(request)
        recipe = data.pop("_recipe", "") or None
        sections = formlib.build_form()
        args, cfg_or_err = plan_run(sections, data, recipe_path(recipe))
        if isinstance(cfg_or_err, ConfigError):
            per, general = formlib.field_errors(sections, data, cfg_or_err)
            return JSONResponse({"ok": False, "errors": per, "general": general}, status_code=422)
        return JSONResponse({"ok": True, "command": "tuneforge " + shlex.join(args), "config": to_yaml(cfg_or_err)})

    # ------------------------------------------------------------------------------------------ tables
    @app.get("/tables", response_class=HTMLResponse)
    async def tables(request: Request) -> HTMLResponse:
        return page(request, "tables.html", tables=folder.tables())

    @app.get("/table/{table_id:path}", response_class=HTMLResponse)
    async def table(request: Request, table_id: str) -> HTMLResponse:
        found = {t.id: t for t in folder.tables()}.get(table_id)
        if found is None:
            raise HTTPException(404, f"no compare or forgetting table at {table_id!r}")
        return page(request, "table.html", table=found, html=_markdown(found.markdown, table_id))

    # ------------------------------------------------------------------------------------------ try it
    @app.post("/api/try/{run_id:path}")
    async def try_run(request: Request, run_id: str) -> JSONResponse:
        check_header(request)
        d = run_dir(run_id)
        if tryit is None:
            raise HTTPException(404, "try-it is off in this UI")
        if not (d / "model" / "config.json").is_file():
            return JSONResponse({"error": "this run has no saved model yet (it is saved when training ends)"}, 409)
        try:
            server = await run_in_threadpool(tryit.get)
            return JSONResponse(await server.load(run_id, d))
        except TuneforgeError as e:
            return JSONResponse({"error": str(e)}, 400)
        except Exception as e:  # the server's APIError and loading errors: say why, keep the UI up
            return JSONResponse({"error": getattr(e, "message", None) or f"{type(e).__name__}: {e}"}, 400)

    return app


class _LazyTryIt:
    """The embedded `tuneforge serve` app (`tuneforge.ui.tryit.TryIt`), built on its first request."""

    def __init__(self, device: str):
        self.device = device
        self._server: Any = None
        self._lock = threading.Lock()

    def get(self) -> Any:
        with self._lock:
            if self._server is None:
                from tuneforge.ui.tryit import TryIt

                self._server = TryIt(self.device)
            return self._server

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        server = self._server or await run_in_threadpool(self.get)
        await server.app(scope, receive, send)

    def close(self) -> None:
        if self._server is not None:
            self._server.close()


def _planned(job: dict[str, Any], cwd: Path) -> dict[str, Any] | None:
    """The config a launched run will write (from its ``train`` arguments), shown until it writes its own."""
    args = [a for a in job.get("args", [])[1:] if not a.startswith("--")]
    recipe = cwd / args[0] if args and "=" not in args[0] else None
    try:
        return load_config(recipe, args[1:] if recipe else args).model_dump(mode="json")
    except (ConfigError, OSError):
        return None


def _base_config(recipe: Path | None, notes: list[str]) -> RunConfig:
    try:
        return load_config(recipe)
    except ConfigError as e:
        notes.append(f"the recipe does not validate as it is: {e}")
        return RunConfig()


def _out_dir(cfg: RunConfig, cwd: Path) -> Path:
    assert cfg.output_dir is not None
    return (cwd / cfg.output_dir).resolve()


def _check_out_dir(cfg: RunConfig, folder: RunsFolder, cwd: Path) -> None:
    out = _out_dir(cfg, cwd)
    if not folder.contains(out) or any(p.startswith(".") for p in out.relative_to(folder.root).parts):
        raise ConfigError(f"must be a folder inside the runs folder {folder.root}", key="output_dir")
    if out.exists() and any(out.iterdir()):
        raise ConfigError(f"{out} exists and is not empty (resume it from its run page)", key="output_dir")
