"""One running sdbridge instance: rings, state, OSC, telemetry, the web and OSCQuery servers and the
render thread, started and stopped together.

`Daemon` is what `sdbridge serve` runs in the foreground and `sdbridge demo` runs in-process. It wires
the parts and owns their lifetimes; the parts themselves know nothing of each other.
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import os
import threading
import time
from typing import Any, Mapping

from engines import controlnet as controlnets
from engines import prompt_syntax, registry
from engines.backends import torch_backend
from engines.bundle import ModelError
from engines.folders import CHECKPOINTS, LORAS, TAESD, VAE, ModelFolders
from engines.stream import Stream

from . import access, osc, oscquery, params, shm
from .builds import EngineService
from .commands import COMMANDS, Commands
from .config import ConfigError, Settings, user_folder
from .controls import ControlInputs, ControlPolicy
from .loop import RenderLoop, output_format, stream_settings
from .presets import PresetError, Presets, default_folder
from . import recorder, schedule
from .recorder import Recorder
from .schedule import Schedules, ShowClock
from .show import Show
from .state import Snapshot, StateStore
from .web import WebServer

log = logging.getLogger(__name__)

HEARTBEAT_S = 0.5  # the output ring's heartbeat_ns is never older than this while the daemon runs
ERROR_BURST = 20  # error reports sent at once at most, then ERROR_RATE per second
ERROR_RATE = 20.0


class Daemon:
    def __init__(self, settings: Settings, initial: Mapping[str, Any] | None = None):
        self.settings = settings
        self.output = output_format(settings.output_dtype, settings.output_channels, settings.output_order,
                                    settings.output_origin)
        self.folders = ModelFolders(settings.models_dir)
        # fail fast, before anything is created
        registry.resolve(settings.model, self.folders, allow_pickle=settings.allow_pickle)
        self.device = registry.pick_device(settings.device)
        self.dtype = registry.pick_dtype(settings.dtype, self.device)
        try:
            self.fast_path = torch_backend.TorchOptions.resolve(
                self.device, cuda_graph=settings.cuda_graph, compile=settings.compile,
                channels_last=settings.channels_last)
        except ValueError as e:
            raise ModelError(str(e)) from None
        self.styles = prompt_syntax.load_styles(settings.styles_file) if settings.styles_file else {}
        self.presets = Presets(settings.presets_dir or default_folder())
        self.name_in, self.name_out = shm.segment_names(settings.instance)
        for name in settings.controlnets:  # fail fast on a typo, before anything is created
            controlnets.resolve(name, self.folders)
        # ControlNet k reads sdb_<instance>_cn<k> and shows what it sees in sdb_<instance>_cn<k>_view
        self.control_names = [(shm.ring_name(settings.instance, f"cn{k}"),
                               shm.ring_name(settings.instance, f"cn{k}_view") if settings.control_view else None)
                              for k in range(len(settings.controlnets))]
        self.ring_in: shm.Ring | None = None
        self.ring_out: shm.Ring | None = None
        self.control_rings: list[shm.Ring] = []  # the cn<k> rings, then the views
        self.loop: RenderLoop | None = None
        self.store: StateStore | None = None
        initial = {"model": settings.model, **{p.name: p.default for p in params.controlnet_params(len(settings.controlnets))},
                   **self._start_preset(), **(initial or {})}
        self._check_names(params.validate(initial))
        self.store = StateStore(initial, check=self._check_output_fits)
        self.schedules = Schedules(settings.schedules_dir or schedule.default_folder())  # read when asked
        self.show = Show(self.store, self.apply, self.report_error, ShowClock())
        self.recorder = Recorder(settings.recordings_dir or recorder.default_folder(),
                                 latest_frame=lambda: self.ring_out.read_latest() if self.ring_out else None,
                                 report_error=self.report_error)
        self.commands = Commands(self._command_handlers())
        # Show commands run here, one at a time in the order they came, off the network thread (a snapshot
        # encodes a PNG, /record/stop waits for the file to be finished)
        self._command_worker = concurrent.futures.ThreadPoolExecutor(1, "sdbridge-commands")
        # torch or TensorRT (refuses to start for backend = tensorrt where TensorRT cannot run)
        self.engines = EngineService(settings, lambda: self.store.snapshot().values, self._between_frames,
                                     self.device)
        self.telemetry = osc.Telemetry(settings.telemetry_host, settings.telemetry_port)
        # Exposed to the network with no token given: the one kept for this user, so bookmarked links last.
        token = settings.token or (access.kept_token(user_folder() / "token")
                                   if not access.is_loopback(settings.host) else "")
        self.access = access.Access(settings.host, token, settings.osc_allow)
        self.limits = access.RateLimit(settings.max_message_rate)  # per client, every listener's
        self.osc_port = settings.osc_port
        self.errors = 0
        self._errors_suppressed = 0
        self._error_tokens = float(ERROR_BURST)
        self._error_refill = time.monotonic()
        self._error_lock = threading.Lock()
        self._aio: asyncio.AbstractEventLoop | None = None
        self._aio_thread: threading.Thread | None = None
        self._transport: asyncio.DatagramTransport | None = None
        self.web: WebServer | None = None
        self.oscquery: oscquery.OscQueryServer | None = None
        self._advertiser: oscquery.Advertiser | None = None
        self._telemetry_loop: asyncio.Task | None = None
        self._stopped = False

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> None:
        """Create the rings, open the OSC port and start loading the model; returns at once."""
        s = self.settings
        _refuse_if_served(self.name_out, s.instance)
        capacity = shm.slot_capacity_for(s.max_width, s.max_height, 4, 4)
        self.ring_in = shm.Ring.create(self.name_in, capacity, s.slot_count, writer=False)
        self.ring_out = shm.Ring.create(self.name_out, capacity, s.slot_count)
        self.loop = RenderLoop(load_stream=self._load_stream, load_autoencoder=self._load_autoencoder,
                               store=self.store, ring_in=self.ring_in,
                               ring_out=self.ring_out, output=self.output, report_error=self.report_error,
                               on_serving=self.engines.activate, controls=self._control_inputs(capacity),
                               on_output=self.recorder.offer)
        self._aio = asyncio.new_event_loop()
        self._aio_thread = threading.Thread(target=self._aio.run_forever, name="sdbridge-io", daemon=True)
        self._aio_thread.start()
        try:
            self._transport = asyncio.run_coroutine_threadsafe(self._start_io(), self._aio).result(10)
        except Exception:
            self.stop()
            raise
        self.osc_port = self._transport.get_extra_info("sockname")[1]
        # mDNS listens on every network whatever it advertises: a daemon for this machine only stays off it
        advertise = s.mdns and self.access.exposed
        if advertise:
            self._advertiser = oscquery.Advertiser(s.instance, s.host, self.oscquery.port, self.osc_port)
            self._advertiser.start()  # in the background: probing the network takes seconds
        self.loop.start()
        self.show.start()
        log.info("OSC control on udp://%s:%d; telemetry to udp://%s:%d", s.host, self.osc_port,
                 s.telemetry_host, s.telemetry_port)
        link = f"?token={self.access.token}" if self.access.exposed else ""
        for address in oscquery.reachable_addresses(s.host):  # for 0.0.0.0: the ones to open on a phone
            log.info("web control page on http://%s:%d/%s (WebSocket /ws); OSCQuery on http://%s:%d/%s", address,
                     self.web.port, link, address, self.oscquery.port, " (advertised over mDNS)" if advertise else "")
        if self.access.exposed:
            log.info("open to the network: other machines need the link's token for the web page and WebSocket; "
                     "OSC and OSCQuery answer %s", ", ".join(map(str, self.access.networks)) + " and this machine"
                     if self.access.networks else "this machine only (add --osc-allow ADDRESS for a phone or tablet)")
        log.info("shared memory: input %s, output %s (%d slots, up to %dx%d)", self.name_in, self.name_out,
                 s.slot_count, s.max_width, s.max_height)
        for k, (name, view) in enumerate(self.control_names):
            log.info("controlnet %d (%s, %s): control images in %s%s", k, s.controlnets[k], s.preprocess(k), name,
                     f", what it sees in {view}" if view else "")

    def _control_inputs(self, capacity: int) -> ControlInputs:
        """The ControlNets' rings (created here, removed at stop) and what reads them."""
        s = self.settings
        view_capacity = shm.slot_capacity_for(s.max_width, s.max_height, self.output.channels, self.output.dtype.itemsize)
        rings: list[shm.Ring] = []
        views: list[shm.Ring | None] = []
        for name, view in self.control_names:  # each kept as soon as it exists: stop() removes what was made
            rings.append(shm.Ring.create(name, capacity, s.slot_count, writer=False))
            self.control_rings.append(rings[-1])
            views.append(shm.Ring.create(view, view_capacity, s.slot_count) if view else None)
            if views[-1] is not None:
                self.control_rings.append(views[-1])
        policy = ControlPolicy(max_age_s=s.control_max_age, stale=s.control_stale, canny_low=s.canny_low,
                               canny_high=s.canny_high)
        return ControlInputs(rings, [s.preprocess(k) for k in range(len(rings))], self.device, views=views,
                             view_format=self.output, policy=policy, report_error=self.report_error)

    async def _start_io(self) -> asyncio.DatagramTransport:
        s = self.settings
        server = osc.OscServer(apply=self.apply, on_error=self.report_error, recall=self.recall_changes,
                               recalled=self.recalled, defer=self._command_worker.submit, save=self.save_preset,
                               access=self.access, limits=self.limits, commands=self.commands)
        try:
            transport = await osc.serve(s.host, s.osc_port, server)
        except OSError as e:
            raise OSError(f"cannot listen for OSC on {s.host}:{s.osc_port} ({e.strerror}); "
                          "is another sdbridge running? Choose another --osc-port") from e
        self._transport = transport  # closed by _stop_io if what follows fails
        osc_port = transport.get_extra_info("sockname")[1]
        self.web = WebServer(self, self.ring_out, max_frame_bytes=self.ring_in.slot_capacity,
                             telemetry_interval=s.telemetry_interval, access=self.access, limits=self.limits,
                             commands=self._command_worker)
        await self.web.start(s.host, s.http_port)
        # OSC over the OSCQuery WebSocket (browser-based clients) is handled like a datagram
        self.oscquery = oscquery.OscQueryServer(self.schema_params, self._versioned_values, f"sdbridge {s.instance}",
                                                s.host, osc_port,
                                                on_osc=server.datagram_received, access=self.access,
                                                limits=self.limits)
        await self.oscquery.start(s.host, s.oscquery_port)
        self._telemetry_loop = asyncio.get_running_loop().create_task(self._telemetry_task())
        return transport

    async def _stop_io(self) -> None:
        if self._telemetry_loop is not None:
            self._telemetry_loop.cancel()
        if self._transport is not None:
            self._transport.close()
        # together: each cuts clients that cannot take the closing handshake within about two seconds
        await asyncio.gather(*(server.close() for server in (self.web, self.oscquery) if server is not None),
                             return_exceptions=True)

    def wait_ready(self, timeout: float | None = None) -> bool:
        """Block until the model is loaded (or failed to load); True if it is serving."""
        assert self.loop is not None, "start() first"
        return self.loop.ready.wait(timeout) and self.loop.stream is not None

    def stop(self) -> None:
        """Stop rendering and listening, and remove the shared-memory segments. Safe to call twice."""
        if self._stopped:
            return
        self._stopped = True
        if self._advertiser is not None:
            self._advertiser.close()
        self.engines.stop()
        self.show.stop()
        if self.loop is not None:
            self.loop.stop()
        if self._aio is not None:
            try:
                asyncio.run_coroutine_threadsafe(self._stop_io(), self._aio).result(5)
            except Exception as e:  # shutting down regardless
                log.debug("I/O shutdown: %s", e)
            self._aio.call_soon_threadsafe(self._aio.stop)
            if self._aio_thread is not None:
                self._aio_thread.join(5)
            if self._aio_thread is None or not self._aio_thread.is_alive():
                self._aio.close()  # a stuck loop is left to die with the process: the rings go regardless
            else:
                log.warning("the network thread did not stop within 5 s")
        self._command_worker.shutdown(wait=True, cancel_futures=True)  # no command comes any more
        self.recorder.close()  # after the loop and the commands: the file is finished with every frame
        for ring in (self.ring_in, self.ring_out, *self.control_rings):
            if ring is not None:
                ring.close()
                ring.unlink()
        self.telemetry.close()
        if self.loop is not None:
            stats = self.loop.stats
            log.info("served %d frames, skipped %d similar inputs, refused %d messages or frames, dropped %d unread "
                     "(over a client's rate or from a stranger)", stats.frames, stats.skipped, self.errors,
                     self.dropped)
        log.info("stopped; removed %s and %s%s", self.name_in, self.name_out,
                 f" and {len(self.control_rings)} ControlNet rings" if self.control_rings else "")

    def __enter__(self) -> "Daemon":
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # ------------------------------------------------------------------ parts
    def _load_stream(self, name: str, vae: str) -> Stream:
        """Load a model and make its stream (on the render thread at start, on a worker later)."""
        s = self.settings
        started = time.monotonic()
        log.info("loading model %s on %s (%s)", name, self.device, str(self.dtype).replace("torch.", ""))
        model = registry.load(name, self.device, self.dtype, folders=self.folders, allow_pickle=s.allow_pickle,
                              vae=vae)
        if model.test_model:
            log.warning("model %r is a test model with random or toy weights (for tests and benchmarks): its "
                        "images mean nothing. Use --model NAME or PATH for pictures.", model.name)
        stream = Stream(model, self.device, self.dtype, s.prompt_cache_size, stream_batch=s.stream_batch,
                        styles=self.styles, embeddings=self.folders.embeddings(),
                        find_lora=lambda lora: self.folders.find("loras", lora), allow_pickle=s.allow_pickle,
                        report=self.report_error)
        torch_backend.accelerate(stream, self.fast_path)
        controlnet_modules = controlnets.load_each(s.controlnets, model, self.folders, self.device, self.dtype,
                                                   allow_pickle=s.allow_pickle, report=self.report_error)
        for module in filter(None, controlnet_modules):
            torch_backend.prepare_module(module, self.fast_path)
        stream.set_controlnets(controlnet_modules)
        self._warm_up(stream)
        if self.fast_path.compile:
            log.info("torch.compile and warm-up took %.1f s", stream.warm_up_s)
        if self.engines.serve(stream):
            self._warm_up(stream)  # again: the engines' first frames set up their contexts and graphs
        log.info("model %s (%s, %s) ready in %.1f s (%s; %s)", model.name, model.arch, stream.model.autoencoder.name,
                 time.monotonic() - started, self.engines.describe(stream), self.fast_path.describe())
        return stream

    def _warm_up(self, stream: Stream) -> None:
        try:
            stream.warm_up(stream_settings(self.store.snapshot()), self.output)
        except Exception as e:  # the state may not suit this model yet; the first frame will say why
            log.debug("warm-up frame failed: %s", e)

    def _between_frames(self, work: Any) -> Any:
        """Run work(stream) on the render thread at the next frame boundary and return what it returns
        (engines swapped in); None if the daemon is stopping or the work failed (logged)."""
        if self.loop is None:
            return None
        try:
            return self.loop.call_between_frames(work, timeout=600)
        except (RuntimeError, concurrent.futures.CancelledError, TimeoutError) as e:  # stopping, or stuck
            log.debug("not run between frames: %s", e)
        except Exception:
            log.exception("work between frames failed")
        return None

    def _load_autoencoder(self, stream: Stream, vae: str) -> Any:
        autoencoder = registry.load_autoencoder(vae, stream.model, self.folders, self.device, self.dtype,
                                                allow_pickle=self.settings.allow_pickle)
        torch_backend.prepare_module(autoencoder.module, self.fast_path)
        return self.engines.autoencoder_for(stream, autoencoder)  # on its TensorRT engines where they serve

    # ------------------------------------------------------------------ what the web and OSCQuery servers use
    def snapshot(self) -> Snapshot:
        return self.store.snapshot()

    def _versioned_values(self) -> tuple[int, Mapping[str, Any]]:
        snapshot = self.store.snapshot()
        return snapshot.version, snapshot.values

    def schema_params(self) -> tuple[params.Param, ...]:
        """Every parameter this daemon serves: the fixed ones, a weight for each LoRA in the models folders
        (and any other the state holds) and the fields of the configured ControlNets."""
        loras = [entry.name for entry in self.folders.list(LORAS)]
        loras += sorted(set(params.lora_weights(self.store.snapshot().values)) - set(loras))
        return params.schema_params(loras, len(self.settings.controlnets))

    def schema(self) -> dict[str, Any]:
        """GET /api/schema: every parameter with type, range, default and docs; `options` lists the
        names a free-text parameter (model, vae) can take from the models folders, read afresh, so
        that a LoRA or checkpoint dropped in since shows (the page and TouchDesigner ask rarely)."""
        self.folders.refresh()
        options = {"model": [*registry.BUILT_IN, *(e.name for e in self.folders.list(CHECKPOINTS))],
                   "vae": [*registry.VAE_CHOICES, *sorted({e.name for e in self.folders.list(VAE) + self.folders.list(TAESD)})]}
        described = []
        for p in self.schema_params():
            entry = p.describe()
            if p.name in options:
                entry["options"] = options[p.name]
            described.append(entry)
        return {"protocol": shm.VERSION, "instance": self.settings.instance, "osc_port": self.osc_port,
                "controlnets": list(self.settings.controlnets), "presets": self.preset_names(), "params": described,
                "commands": [command.describe() for command in COMMANDS]}

    def telemetry_values(self) -> dict[str, Any]:
        """Every telemetry value of PROTOCOL.md section 2 (and the extensions), by name under /sdbridge/."""
        values: dict[str, Any] = {
            "status": self.status, "state_version": self.store.version,
            # the name as the performer gave it (a folders name such as sd15/dreamshaper_8, or the path)
            "model": self.loop.serving[0] if self.loop and self.loop.stream else self.settings.model,
            "backend": self.engines.describe(),
            "dropped": self.dropped, **self.show.status()}
        recording = self.recorder.status()
        values.update({"recording": recording.path if recording.recording else "",
                       "record/frames": recording.frames, "record/dropped": recording.dropped})
        if self.engines.attached is not None:
            values["refit_ms"] = float(self.engines.refit_ms)  # 0 if the engines went meanwhile
        if self.loop is not None:
            stats = self.loop.stats
            values.update(fps=float(stats.fps), latency_ms=float(stats.latency_ms), frame=int(stats.frames),
                          skipped=int(stats.skipped), loading=self.loop.loading)
            for k, status in enumerate(self.loop.controls.status()):
                values[f"controlnet/{k}"] = status
        return values

    @property
    def dropped(self) -> int:
        """Messages dropped unread: over a client's rate, or from a machine without the token or osc_allow."""
        return self.limits.dropped + self.access.refused

    def preset_names(self) -> list[str]:
        return self.presets.names()

    def recall_changes(self, name: str) -> dict[str, Any]:
        """The change set that recalls preset `name` over the current state (PresetError if it cannot).
        Once it is applied, `recalled` ends a running morph."""
        return self._configured_only(self.presets.recall(name, self.store.snapshot().values), f"preset {name}")

    def recalled(self) -> None:
        """A recall was applied: it replaces a running morph (which stops where the recall put the look)."""
        self.show.cancel_morph()

    def recall_preset(self, name: str) -> int:
        """Recall preset `name` as one change set; the new state version (PresetError, ParamError)."""
        version = self.apply(self.recall_changes(name))
        self.recalled()
        return version

    def save_preset(self, name: str) -> None:
        """Store the current state as preset `name` (PresetError if it cannot be written)."""
        path = self.presets.save(name, self.store.snapshot().values)
        log.info("preset %s saved to %s", name, path)

    def _start_preset(self) -> dict[str, Any]:
        if not self.settings.preset:
            return {}
        try:
            return self._configured_only(self.presets.load(self.settings.preset), f"preset {self.settings.preset}")
        except PresetError as e:
            raise ConfigError(str(e)) from None

    def _configured_only(self, values: dict[str, Any], source: str) -> dict[str, Any]:
        """`values` without the parameters of ControlNets this daemon does not have, so that a preset made
        with more of them still recalls the rest."""
        count = len(self.settings.controlnets)
        indices = {name: params.controlnet_index(name) for name in values}
        kept = {name: v for name, v in values.items() if indices[name] is None or indices[name] < count}
        if len(kept) < len(values):
            log.info("%s: left out %s (%d ControlNets configured)", source, ", ".join(sorted(set(values) - set(kept))),
                     count)
        return kept

    def offer_input(self, frame: shm.Frame) -> None:
        """An input frame from the WebSocket: rendered like one from the input ring."""
        if self.loop is not None:
            self.loop.offer_input(frame)

    def offer_control(self, k: int, frame: shm.Frame) -> None:
        """A control image for ControlNet k from the WebSocket; ValueError if there is no ControlNet k."""
        if self.loop is None:
            raise ValueError("the daemon is not running")
        self.loop.controls.offer(k, frame)

    def apply(self, changes: Mapping[str, Any], *, only_if: Mapping[str, Any] | None = None) -> int | None:
        """Apply a change set from the network: names are checked against the models folders first,
        outside the state's lock (a folder rescan must not stall the render thread), then the state
        store validates and applies the whole set atomically. With `only_if` (the show driver), only
        while the state still holds those values: None if it no longer does."""
        self._check_names(params.validate(changes))
        return self.store.apply(changes, only_if=only_if)

    # ------------------------------------------------------------------ show commands (bridge/commands)
    def run_command(self, address: str, args: list[Any]) -> Any:
        """Run a show command from the WebSocket (OSC runs them through its own server): its result."""
        return self.commands.run(address, args)

    def _command_handlers(self) -> dict[str, Any]:
        def check(changes: Mapping[str, Any]) -> None:  # what a morph or a schedule will set, checked now
            self._check_names(params.validate(changes))
        return {**self.show.handlers(self.schedules, self.recall_changes, check), **self.recorder.handlers()}

    def _check_names(self, changes: Mapping[str, Any]) -> None:
        """Names from the network must exist in the models folders (and never point outside them)."""
        current = self.store.snapshot().values if self.store is not None else {}
        serving = self.loop.serving if self.loop is not None else ("", "")
        try:
            model = changes.get("model")
            if model is not None and model not in (current.get("model"), serving[0], self.settings.model):
                registry.resolve(model, self.folders, from_network=True, allow_pickle=self.settings.allow_pickle)
            vae = changes.get("vae")
            if vae is not None and vae not in (current.get("vae"), serving[1], *registry.VAE_CHOICES):
                registry.find_autoencoder(vae, self.folders)
            for lora in params.lora_weights(changes):
                if params.LORA_PREFIX + lora not in current:
                    self.folders.find("loras", lora)
        except ModelError as e:
            raise params.ParamError(str(e)) from None
        count = len(self.settings.controlnets)
        for name in changes:
            k = params.controlnet_index(name)
            if k is not None and k >= count:
                raise params.ParamError(f"no ControlNet {k}: {count} configured (--controlnet NAME, one per "
                                        "ControlNet, k from 0)")
        for style in filter(None, (name.strip() for name in changes.get("styles", "").split(","))):
            if style not in self.styles:
                known = ", ".join(sorted(self.styles)) or "none: set styles_file to an A1111 styles.csv"
                raise params.ParamError(f"style {style!r} not found; known: {known}")

    def _check_output_fits(self, values: Mapping[str, Any]) -> None:
        needed = values["width"] * values["height"] * self.output.channels * self.output.dtype.itemsize
        capacity = shm.slot_capacity_for(self.settings.max_width, self.settings.max_height, 4, 4)
        if needed > capacity:
            raise params.ParamError(
                f"resolution {values['width']}x{values['height']} does not fit the output ring "
                f"(max_width x max_height = {self.settings.max_width}x{self.settings.max_height}); "
                "restart with larger --max-width/--max-height")

    def report_error(self, message: str) -> None:
        """Count every error; log it and send it on /sdbridge/error at a bounded rate, so that a flood
        of bad messages can neither fill the log nor the network."""
        with self._error_lock:
            self.errors += 1
            now = time.monotonic()
            self._error_tokens = min(ERROR_BURST, self._error_tokens + (now - self._error_refill) * ERROR_RATE)
            self._error_refill = now
            send = self._error_tokens >= 1
            if send:
                self._error_tokens -= 1
                suppressed, self._errors_suppressed = self._errors_suppressed, 0
            else:
                self._errors_suppressed += 1
        if send:
            log.warning("%s%s", message, f" ({suppressed} more not shown)" if suppressed else "")
            self.telemetry.send("error", message)
            if self.web is not None:
                self.web.report_error(message)

    async def _telemetry_task(self) -> None:
        """Telemetry, and the output ring's heartbeat, also while a model loads or the stream is idle."""
        while True:
            try:
                self.send_telemetry()
            except Exception:  # a value that failed to read must not stop the heartbeat
                log.exception("telemetry failed")
            if self.ring_out is not None:
                self.ring_out.heartbeat()
            await asyncio.sleep(min(self.settings.telemetry_interval, HEARTBEAT_S))

    @property
    def status(self) -> str:
        return self.loop.stats.status if self.loop else "loading"

    def send_telemetry(self) -> None:
        """Send every telemetry value over OSC once."""
        for name, value in self.telemetry_values().items():
            self.telemetry.send(name, value)


def _refuse_if_served(name_out: str, instance: str) -> None:
    """Refuse to start when a live daemon already serves this instance (its heartbeat is fresh)."""
    try:
        ring = shm.Ring.attach(name_out)
    except (FileNotFoundError, shm.RingError):
        return
    try:
        pid, age_s = ring.writer_pid, (time.monotonic_ns() - ring.heartbeat_ns) / 1e9
    finally:
        ring.close()
    if pid and pid != os.getpid() and age_s < 4 * HEARTBEAT_S and _process_alive(pid):
        raise shm.RingError(f"instance {instance!r} is already served by process {pid}; stop it or choose "
                            "another --instance (and ports)")


def _process_alive(pid: int) -> bool:
    if os.name == "nt":
        return True  # os.kill(pid, 0) would send CTRL_C_EVENT there; the fresh heartbeat is proof enough
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True  # it exists (another user's) or we cannot tell: err on the side of not clobbering it
    return True
