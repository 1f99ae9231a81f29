"""The live dial: a web page with a slider, and an API whose requests are decoded together in batches.

    python serve.py --ckpt out/ckpt.pt              # then open the address it prints

Routes: GET / (the page), GET /api/info, POST /api/generate (JSON in, JSON out), POST /api/stream
(the same JSON in, server-sent events out, in whole characters). Every request in flight joins one
BatchedDecoder, so many users at different dials share each forward; its steps run on a thread apart
from this event loop (serve.py's main thread), so the loop stays free to answer. Turns are shared
between clients, told apart by their address. Bad input gets a 4xx JSON error {"error": message} naming
the field; a full queue 503 with Retry-After, and a client with too many requests waiting 429 with
Retry-After; a request past its deadline 504, or an error event on a stream. A client that leaves frees
its slot at the next step. Needs the [serve] extra (Starlette, uvicorn).
"""
import asyncio
import json
import logging
import random
import threading
import time
from contextlib import asynccontextmanager
from dataclasses import asdict
from pathlib import Path

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request as HttpRequest
from starlette.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from abcgpt.core.errors import SettingsError
from abcgpt.data.corpus import source_alphas
from abcgpt.data.tokenizer import TextStream, UnknownCharactersError
from abcgpt.gates.voice import UNIFORM, Dial, parse_voice
from abcgpt.model.sampling import Generation

from . import settings
from .access import Access
from .api_input import BadInput, ClientGone, check_fields, number, parse_json, read_body
from .batching import BatchedDecoder, ClientQueueFull, QueueFull, Request, Stopped, TimedOut
from .connections import RETRY_AFTER, strict_http

PAGE = Path(__file__).with_name("page.html")
log = logging.getLogger(__name__)


class Service:
    """The model, its tokenizer and decoder, and how a request's fields become a Request."""

    def __init__(self, model, tokenizer, run, max_batch=32, max_new_tokens=500, max_body=16_384, max_queue=None,
                 timeout=120.0, body_timeout=10.0, access=None, max_per_client=None, max_queued_per_client=None,
                 decoder_thread=True):
        self.model, self.tokenizer, self.run = model, tokenizer, run
        self.names = run.source_names
        self.dial_map = run.dial_map
        self.max_new_tokens, self.max_body = max_new_tokens, max_body
        self.timeout, self.body_timeout = timeout, body_timeout
        self.access = Access() if access is None else access
        self.decoder = BatchedDecoder(model, max_batch, max_queue, max_per_client=max_per_client,
                                      max_queued_per_client=max_queued_per_client)
        # True: the app's lifespan runs the decoder in a thread of its own; False: the caller runs
        # decoder.serve(service.loop) once `started` is set (serve.py, on its main thread)
        self.decoder_thread = decoder_thread
        self.loop, self.started = None, threading.Event()

    def info(self):
        c = self.model.config
        if c.geometry == "line":
            sources = [{"name": n, "alpha": a} for n, a in zip(self.names, source_alphas(max(2, len(self.names))))]
        else:
            sources = [{"name": n, "vertex": k} for k, n in enumerate(self.names)]
        return {
            "sources": sources, "geometry": c.geometry, "uniform": UNIFORM,
            "model": {k: getattr(c, k) for k in ("n_layer", "n_head", "n_embd", "block_size", "vocab_size", "gated")},
            "step": self.run.step, "calibrated": bool(self.dial_map), "max_new_tokens": self.max_new_tokens,
            "device": str(self.decoder.device), "defaults": self.defaults(), "sampling": list(settings.SAMPLING),
            "load": {"active": len(self.decoder.active), "queued": len(self.decoder.pending),
                     "max_batch": self.decoder.max_batch, "max_queue": self.decoder.max_queue,
                     "max_per_client": self.decoder.max_per_client,
                     "max_queued_per_client": self.decoder.max_queued_per_client},
        }

    def defaults(self):
        """The page's starting values: every generation default, with the calibration's sampling for a mix."""
        values = {**settings.defaults(), "max_new_tokens": self.new_tokens()}
        return {**values, **(asdict(settings.calibrated_at(self.dial_map)) if self.dial_map else {})}

    def new_tokens(self):
        """The length of a request that names none: the default, within this server's most."""
        return min(settings.GENERATION.max_new_tokens, self.max_new_tokens)

    def request(self, fields, client=None):
        """A Request from the fields of a JSON body, for client (who asks: their turns are shared with the
        others'); BadInput for anything wrong."""
        check_fields(fields)
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
            new_tokens = settings.check_new_tokens(number(fields, "max_new_tokens", self.new_tokens()),
                                                   least=1, most=self.max_new_tokens)
            given = {name: number(fields, name, None) for name in settings.SAMPLING}
            alpha, mix, voice, sampling = self._dial(fields, given)
            seed = settings.check_seed(number(fields, "seed", random.randrange(2**31)))
        except SettingsError as e:
            raise BadInput(str(e)) from None
        return Request(ids, Generation(alpha, sampling, seed, new_tokens), mix, voice, timeout=self.timeout,
                       client=client)

    def _dial(self, fields, given):
        """(dial, mix, voice, Sampling): a voice or an alpha as given, at the sampling settings given (given:
        as for settings.sampling) or the defaults; or a mix through the calibrated map, at the settings it was
        calibrated at."""
        dials = [name for name in ("alpha", "mix", "voice") if name in fields]
        if len(dials) > 1:
            raise BadInput(f"give one of alpha, mix and voice, not {' and '.join(dials)}")
        geometry = self.model.config.geometry
        if self.model.config.gated and ("voice" in fields or (geometry != "line" and not dials)):
            text = fields.get("voice", UNIFORM)  # a dial over many sources starts with every gate open
            if not isinstance(text, str):
                raise BadInput(f"voice must be a string: a source's name, NAME=W,NAME=W or {UNIFORM!r}")
            dial, label = parse_voice(text, self.names, geometry)
            return dial, None, label, settings.sampling(given)
        if self.model.config.gated and geometry != "line" and dials:
            raise BadInput(f"{dials[0]}: this checkpoint's dial is a mixture of its {len(self.names)} sources "
                           f"({geometry}), not one line; give voice: a source's name, NAME=W,NAME=W or {UNIFORM!r}")
        alpha, mix, sampling = self._line_dial(fields, given)
        return alpha, mix, None, sampling

    def _line_dial(self, fields, given):
        """(alpha, mix, Sampling) on the line."""
        if self.model.config.gated and "mix" in fields:
            mix = number(fields, "mix", None)
            alpha, sampling = settings.resolve_mix(
                mix, self.dial_map, given,
                missing="this checkpoint has no calibrated dial: give alpha, or run calibrate.py on it")
            return alpha, mix, sampling
        sampling = settings.sampling(given)
        if not self.model.config.gated:
            return None, None, sampling
        return settings.check_unit(number(fields, "alpha", 0.5), "alpha"), None, sampling

    def result(self, request):
        dial = request.generation.dial
        alpha = None if isinstance(dial, Dial) else dial
        return {"text": self.tokenizer.decode(request.tokens), "alpha": alpha, "mix": request.mix, "voice": request.voice,
                "tokens": len(request.tokens), "seed": request.generation.seed,
                "ms": round((time.perf_counter() - request.started) * 1e3, 1)}


    def submit(self, request):
        try:
            self.decoder.submit(request)
        except ClientQueueFull as e:
            raise BadInput(f"too many requests from you ({e}); try again in {RETRY_AFTER} s", 429) from None
        except QueueFull as e:
            raise BadInput(f"the server is busy ({e}); try again in {RETRY_AFTER} s", 503) from None

    async def tokens(self, request):
        """request's tokens as they come; its end (None) or the client's leaving ends them."""
        while (token := await request.queue.get()) is not None:
            yield token


def error(e):
    wait = {"Retry-After": str(RETRY_AFTER)}
    headers = {503: wait, 429: wait, 401: {"WWW-Authenticate": "Bearer"}, 405: {"Allow": "POST"}}.get(
        e.status)
    return JSONResponse({"error": str(e)}, status_code=e.status, headers=headers)


def failure(request):
    """The status and message of a request that ended before its last token."""
    status = {TimedOut: 504, Stopped: 503}.get(type(request.error), 500)
    return status, str(request.error)


async def cancel_when_gone(http, request):
    """Mark request cancelled once its client disconnects (the decoder then frees its slot)."""
    while (await http.receive())["type"] != "http.disconnect":
        pass
    request.cancelled = True
    request.queue.put_nowait(None)


def create_app(service):
    html = PAGE.read_text()  # read once, not per visit

    async def page(_):
        return HTMLResponse(html)

    async def info(http: HttpRequest):
        try:
            service.access.check(http)
        except BadInput as e:
            return error(e)
        return JSONResponse(service.info())

    async def submitted(http, streamed):
        """The Request a JSON POST asks for, submitted; or the Response that refuses it."""
        try:
            service.access.check(http, json_body=True)
            fields = parse_json(await read_body(http, service.max_body, service.body_timeout))
            request = service.request(fields, client=http.client.host if http.client else None)
            request.streamed = streamed  # a POST waits for the end: its tokens need not wake this loop one by one
            service.submit(request)
        except BadInput as e:
            return error(e)
        except ClientGone:
            log.warning("a client left while sending its request")
            return Response(status_code=400)
        return request

    async def generate(http: HttpRequest):
        request = await submitted(http, streamed=False)
        if isinstance(request, Response):
            return request
        watcher = asyncio.create_task(cancel_when_gone(http, request))
        try:
            await request.queue.get()  # its end, or the client's leaving: None either way
        finally:
            watcher.cancel()
        if request.cancelled:
            log.info("a client left before its generation ended; its slot is free")
            return Response(status_code=499)  # nobody reads it
        if request.error is not None:
            status, message = failure(request)
            return JSONResponse({"error": message, **service.result(request)}, status_code=status)
        return JSONResponse(service.result(request))

    async def stream(http: HttpRequest):
        if http.method != "POST":  # a GET any page can make, in an iframe or an image, with no preflight
            return error(BadInput("POST the request to /api/stream as JSON (Content-Type: application/json), as "
                                  "to /api/generate", 405))
        request = await submitted(http, streamed=True)
        if isinstance(request, Response):
            return request

        async def events():
            text = TextStream(service.tokenizer)  # whole characters only, decoding just the new token
            try:
                async for token in service.tokens(request):
                    delta = text.feed([token])
                    if delta:
                        yield f"data: {json.dumps({'text': delta})}\n\n"
                rest = text.flush()
                if rest:
                    yield f"data: {json.dumps({'text': rest})}\n\n"
                if request.error is not None:
                    yield f"event: error\ndata: {json.dumps({'error': failure(request)[1]})}\n\n"
                else:
                    yield f"event: done\ndata: {json.dumps(service.result(request))}\n\n"
            finally:  # the client went away, or the stream ended: either way the slot is freed
                if not request.done:
                    log.info("a client left its stream before the end; its slot is free")
                request.cancelled = True

        return StreamingResponse(events(), media_type="text/event-stream", headers={"Cache-Control": "no-store"})

    @asynccontextmanager
    async def lifespan(_):
        service.loop = asyncio.get_running_loop()
        task = asyncio.create_task(service.decoder.run()) if service.decoder_thread else None
        service.started.set()
        yield
        if task is not None:
            task.cancel()

    routes = [Route("/", page), Route("/api/info", info), Route("/api/generate", generate, methods=["POST"]),
              Route("/api/stream", stream, methods=["GET", "POST"])]
    async def http_error(http, e):  # 404, 405 and the rest in the API's one error shape
        return JSONResponse({"error": e.detail}, status_code=e.status_code, headers=getattr(e, "headers", None))

    app = Starlette(routes=routes, lifespan=lifespan, exception_handlers={HTTPException: http_error})
    app.router.redirect_slashes = False  # its redirect would build Location from the client's Host header
    return strict_http(app)
