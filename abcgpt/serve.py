"""The live dial: a web page with a slider, and an API whose requests are decoded together in batches.

    python serve.py --ckpt out/ckpt.pt              # then open the address it prints

Routes: GET / (the page), GET /api/info, POST /api/generate (JSON in, JSON out),
GET /api/stream (the same as server-sent events, one per token). Every request in
flight joins one BatchedDecoder, so many users at different dials share each
forward. Bad input gets a 4xx JSON error {"error": message} and the server goes on.
Needs the [serve] extra (Starlette, uvicorn).
"""
import asyncio
import json
import math
import random
import time
from contextlib import asynccontextmanager
from pathlib import Path

from starlette.applications import Starlette
from starlette.requests import Request as HttpRequest
from starlette.responses import HTMLResponse, JSONResponse, StreamingResponse
from starlette.routing import Route

from . import settings
from .batching import BatchedDecoder, Request
from .data import source_alphas
from .errors import SettingsError, UserError
from .tokenizer import UnknownCharactersError

FIELDS = {"prompt", "alpha", "mix", "max_new_tokens", "temperature", "top_k", "seed"}
PAGE = Path(__file__).with_name("page.html")


class BadInput(UserError):
    """A request the server refuses, with the HTTP status to answer it with."""

    def __init__(self, message, status=400):
        super().__init__(message)
        self.status = status


def _number(fields, name, kind, default):
    """fields[name] as kind (int or float), from JSON or from a query string; default where it is absent."""
    if name not in fields:
        return default
    value = fields[name]
    if isinstance(value, str):
        try:
            value = kind(value)
        except ValueError:
            raise BadInput(f"{name} must be a number, got {value!r}") from None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (kind is int and value != int(value)):
        raise BadInput(f"{name} must be {'an integer' if kind is int else 'a number'}, got {value!r}")
    if isinstance(value, float) and not math.isfinite(value):
        raise BadInput(f"{name} must be finite, got {value}")
    return kind(value)


class Service:
    """The model, its tokenizer and decoder, and how a request's fields become a Request."""

    def __init__(self, model, tokenizer, run, max_batch=32, max_new_tokens=500, max_body=16_384):
        self.model, self.tokenizer, self.run = model, tokenizer, run
        self.names = run.source_names
        self.dial_map = run.dial_map
        self.max_new_tokens, self.max_body = max_new_tokens, max_body
        self.decoder = BatchedDecoder(model, max_batch)

    def info(self):
        c = self.model.config
        return {
            "sources": [{"name": n, "alpha": a} for n, a in zip(self.names, source_alphas(max(2, len(self.names))))],
            "model": {k: getattr(c, k) for k in ("n_layer", "n_head", "n_embd", "block_size", "vocab_size", "gated")},
            "step": self.run.step, "calibrated": bool(self.dial_map), "max_new_tokens": self.max_new_tokens,
            "device": str(self.decoder.device), "defaults": self.defaults(),
        }

    def defaults(self):
        """The page's starting values: the sampling settings' defaults, or the calibration's for a mix."""
        values = {**settings.defaults(), "max_new_tokens": min(settings.DEFAULTS.max_new_tokens, self.max_new_tokens)}
        return {**values, **(settings.calibrated_at(self.dial_map) if self.dial_map else {})}

    def request(self, fields):
        """A Request from the fields of a JSON body or a query string; BadInput for anything wrong."""
        unknown = sorted(set(fields) - FIELDS)
        if unknown:
            raise BadInput(f"unknown field(s): {', '.join(unknown)}; known are {', '.join(sorted(FIELDS))}")
        prompt = fields.get("prompt", "\n")
        if not isinstance(prompt, str) or not prompt:
            raise BadInput("prompt must be a non-empty string")
        try:
            ids = self.tokenizer.encode(prompt)
        except UnknownCharactersError as e:
            raise BadInput(f"the prompt has {e}") from None
        if len(ids) > self.model.config.block_size:
            raise BadInput(f"the prompt is {len(ids)} tokens long; the context holds {self.model.config.block_size}")
        try:
            new_tokens = settings.check_new_tokens(
                _number(fields, "max_new_tokens", int, min(settings.DEFAULTS.max_new_tokens, self.max_new_tokens)),
                least=1, most=self.max_new_tokens)
            temperature = _number(fields, "temperature", float, None)
            top_k = _number(fields, "top_k", int, None)
            alpha, mix, temperature, top_k = self._dial(fields, temperature, top_k)
            settings.check_temperature(temperature)
            settings.check_top_k(top_k)
            seed = settings.check_seed(_number(fields, "seed", int, random.randrange(2**31)))
        except SettingsError as e:
            raise BadInput(str(e)) from None
        return Request(ids, alpha, new_tokens, temperature, top_k, seed, mix)

    def _dial(self, fields, temperature, top_k):
        """(alpha, mix, temperature, top_k): alpha as given at the sampling settings given or the defaults,
        or a mix through the calibrated map, at the settings it was calibrated at."""
        if "alpha" in fields and "mix" in fields:
            raise BadInput("give alpha or mix, not both")
        if self.model.config.gated and "mix" in fields:
            mix = _number(fields, "mix", float, None)
            alpha, temperature, top_k = settings.resolve_mix(
                mix, self.dial_map, temperature, top_k,
                missing="this checkpoint has no calibrated dial: give alpha, or run calibrate.py on it")
            return alpha, mix, temperature, top_k
        temperature = settings.DEFAULTS.temperature if temperature is None else temperature
        top_k = settings.DEFAULTS.top_k if top_k is None else top_k
        if not self.model.config.gated:
            return None, None, temperature, top_k
        return settings.check_unit(_number(fields, "alpha", float, 0.5), "alpha"), None, temperature, top_k

    def result(self, request):
        return {"text": self.tokenizer.decode(request.tokens), "alpha": request.alpha, "mix": request.mix,
                "tokens": len(request.tokens), "seed": request.seed,
                "ms": round((time.perf_counter() - request.started) * 1e3, 1)}


def error(e):
    return JSONResponse({"error": str(e)}, status_code=e.status)


def create_app(service):
    html = PAGE.read_text()  # read once, not per visit

    async def page(_):
        return HTMLResponse(html)

    async def info(_):
        return JSONResponse(service.info())

    async def generate(http: HttpRequest):
        try:
            body = await http.body()
            if len(body) > service.max_body:
                raise BadInput(f"the request body is over {service.max_body} bytes", 413)
            try:
                fields = json.loads(body)
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise BadInput(f"malformed JSON: {e}") from None
            if not isinstance(fields, dict):
                raise BadInput("the body must be a JSON object")
            request = service.request(fields)
        except BadInput as e:
            return error(e)
        service.decoder.submit(request)
        while await request.queue.get() is not None:
            pass
        return JSONResponse(service.result(request))

    async def stream(http: HttpRequest):
        try:
            request = service.request(dict(http.query_params))
        except BadInput as e:
            return error(e)
        service.decoder.submit(request)

        async def events():
            text = ""
            try:
                while await request.queue.get() is not None:
                    full = service.tokenizer.decode(request.tokens)
                    yield f"data: {json.dumps({'text': full[len(text):]})}\n\n"
                    text = full
                yield f"event: done\ndata: {json.dumps(service.result(request))}\n\n"
            finally:  # the client went away, or the stream ended: either way the slot is freed
                request.cancelled = True

        return StreamingResponse(events(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

    @asynccontextmanager
    async def lifespan(_):
        task = asyncio.create_task(service.decoder.run())
        yield
        task.cancel()

    routes = [Route("/", page), Route("/api/info", info), Route("/api/generate", generate, methods=["POST"]),
              Route("/api/stream", stream)]
    return Starlette(routes=routes, lifespan=lifespan)
