"""The sdbridge component's extension (a Base COMP extension, promoted): the only code that touches
TouchDesigner objects. Each frame it writes the input TOPs into the daemon's rings, sends the custom
parameters that changed, reads the newest output for the Script TOP and shows telemetry; pulses save
and recall presets and launch the daemon. What to send, and when, is decided in parameters.py and
client.py, which plain Python tests run against a real daemon.

The component (assembled by build.py) holds, beside this DAT (sdb_extension):
  in1            In TOP: the video to diffuse        -> input_fit (Null TOP at Width x Height)
  in2, in3, ...  In TOPs: ControlNet 0, 1, ... images -> cn0_fit, cn1_fit, ...
  output         Script TOP showing the daemon's frames (callbacks: output_callbacks) -> out1
  frame_exec     Execute DAT: onFrameStart -> Frame(), onExit -> Shutdown(stop_daemon=True)
  par_exec       Parameter Execute DAT: pulses -> Pulse(name)
  schema, log    the daemon's schema (JSON) and the launched daemon's log
TouchDesigner's API as used here is listed with its sources in docs/touchdesigner.md.

Nothing a frame does may stop the next one: each step reports its failure (Last Error, the
textport) and the frame goes on.
"""
import dataclasses
import json
import os
import shlex
import signal
import time
from typing import Any

try:  # inside TouchDesigner: the component's own Text DATs
    import sdb_client as client
    import sdb_parameters as parameters
except ImportError:  # anywhere else (the tests): the package
    from touchdesigner import client, parameters

CONTROL_INPUT_OFFSET = 1  # ControlNet k is the component's input k + 1 (input 0 is the video)
# Pulses that send a show command with no arguments (the daemon names the files).
SHOW_COMMANDS = {"Startrecording": "/record/start", "Stoprecording": "/record/stop", "Snapshot": "/snapshot"}
PRESET_SETTLE_S = 0.25  # a recall reaches the daemon over UDP; its state is fetched over HTTP after this
DOWNLOADS_AFTER_A_CHANGE = 2  # numpyArray(delayed=True) hands back the previous call's download: the
# second call after a change brings the changed image
LAUNCHED_PID = "sdbridge_launched_pid"  # stored on the component: a re-initialised extension can still Stop


class SdbridgeExt:
    """Promoted: `op('sdbridge').Frame()`, `.Pulse(name)`, `.CookOutput(scriptOp)`, `.Shutdown()`."""

    def __init__(self, ownerComp: Any):
        self.ownerComp = ownerComp
        self.launcher = client.Launcher()
        self.fetches = client.Fetches()
        self.link: client.DaemonLink | None = None
        self.frame = None  # the newest output frame; the Script TOP copies it when it cooks
        self.problem = (0.0, "")  # this component's own last error: (time.monotonic(), text)
        self._frames = 0  # the frame_id of the frames sent: any increasing id will do
        self._shown: dict[str, Any] = {}
        self._log_written = 0
        self._control_cooks: dict[int, int] = {}  # ControlNet k -> its TOP's totalCooks when last seen
        self._control_downloads: dict[int, int] = {}  # ControlNet k -> downloads still to send
        self._load_schema(json.loads(ownerComp.op("schema").text))

    # ------------------------------------------------------------------ called by the component
    def Frame(self) -> None:
        """Once a frame (frame_exec's onFrameStart)."""
        self.launcher.reap()
        link = self._step("connecting", self._link)
        if link is not None:
            if self._step("following the daemon", link.tick):
                self._new_daemon()
            if self.ownerComp.par.Active.eval():
                self._step("sending frames", self._send_frames, link)
                self._step("sending parameters", self._send_changes, link)
            self._step("reading the output", self._read_output, link)
        self._step("taking HTTP answers", self._take_fetches)
        self._step("showing status", self._show)

    def CookOutput(self, scriptOp: Any) -> None:
        """The Script TOP's onCook: show the newest output frame."""
        if self.frame is not None:
            scriptOp.copyNumpyArray(self.frame.pixels)

    def Pulse(self, name: str) -> None:
        """A pulse parameter was pressed (par_exec's onPulse)."""
        comp = self.ownerComp
        try:
            link = self._link()
            if name == "Savepreset":
                link.sender.save_preset(self._preset_name())
                self.fetches.start("presets", link.endpoints.url("/api/schema"), delay_s=PRESET_SETTLE_S)
            elif name == "Recallpreset":
                link.sender.recall_preset(self._preset_name())
                self.fetches.start("state", link.endpoints.url("/api/state"), delay_s=PRESET_SETTLE_S)
            elif name == "Morphpreset":
                seconds = float(comp.par.Morphseconds.eval())
                link.sender.command("/preset/morph", self._preset_name(), seconds)
                self.fetches.start("state", link.endpoints.url("/api/state"), delay_s=seconds + PRESET_SETTLE_S)
            elif name in SHOW_COMMANDS:
                link.sender.command(SHOW_COMMANDS[name])
            elif name == "Pullstate":
                self.fetches.start("state", link.endpoints.url("/api/state"))
            elif name == "Updatepars":
                self.fetches.start("schema", link.endpoints.url("/api/schema"))
            elif name == "Resend":
                self._new_daemon()
            elif name == "Launch":
                self._launch(link)
            elif name == "Stop":
                self._stop(link)
        except Exception as e:  # noqa: BLE001 - a pulse must never leave an exception in TouchDesigner
            self._report(f"{getattr(comp.par, name).label}: {e}")

    def Shutdown(self, stop_daemon: bool = False) -> None:
        """Let go of the rings and sockets (the next frame takes them again); with `stop_daemon`, also
        stop the daemon Launch started, waiting for it (frame_exec's onExit: quitting TouchDesigner)."""
        if stop_daemon and self.launcher.running:
            self.launcher.stop(wait=True, timeout=5.0)
        if self.link is not None:
            self.link.close()
            self.link = None
        self._control_cooks.clear()

    def onDestroyTD(self) -> None:  # TouchDesigner 2025: the extension is re-initialized or deleted
        self.Shutdown()

    def __delTD__(self) -> None:  # the same in TouchDesigner 2023
        self.Shutdown()

    # ------------------------------------------------------------------ frames and parameters
    def _step(self, what: str, step: Any, *args: Any) -> Any:
        try:
            return step(*args)
        except Exception as e:  # noqa: BLE001 - one failing step must not stop the frame, or the next
            self._report(f"{what}: {e}")
            return None

    def _endpoints(self) -> client.Endpoints:
        par = self.ownerComp.par
        return client.Endpoints(par.Instance.eval().strip(), par.Host.eval().strip(), int(par.Oscport.eval()),
                                int(par.Telemetryport.eval()), int(par.Httpport.eval()))

    def _link(self) -> client.DaemonLink:
        endpoints = self._endpoints()
        if self.link is None or self.link.endpoints != endpoints:
            if self.link is not None:
                self.link.close()
                self.link = None
            self.link = client.DaemonLink(endpoints, controlnets=len(self.schema.get("controlnets", ())))
            self._new_daemon()
        return self.link

    def _new_daemon(self) -> None:
        """A daemon appeared (or Resend): it gets the whole look, and the control images again."""
        self.sync.forget()
        self._control_cooks.clear()

    def _send_frames(self, link: client.DaemonLink) -> None:
        comp = self.ownerComp
        if not link.connected:
            return  # no daemon: download nothing
        self._frames += 1
        if comp.par.Sendinput.eval() and self._connected(0):
            top = comp.op("input_fit")
            top.cook()  # a TOP cooks when something asks for it; in perform mode nothing else does
            pixels = top.numpyArray(delayed=True)  # the previous frame's download: no GPU stall
            if pixels is not None:
                link.input.write(_float32(pixels), frame_id=self._frames, flags=client.shm.FLAG_BOTTOM_LEFT)
        for k, ring in enumerate(link.controls):
            if self._connected(k + CONTROL_INPUT_OFFSET):
                self._send_control(k, ring, comp.op(f"cn{k}_fit"))

    def _send_control(self, k: int, ring: Any, top: Any) -> None:
        """A control image goes out when its TOP cooked anew (twice: the delayed download lags a call);
        a still one is only kept alive with the ring's heartbeat."""
        top.cook()
        if self._control_cooks.get(k) != top.totalCooks:
            self._control_cooks[k] = top.totalCooks
            self._control_downloads[k] = DOWNLOADS_AFTER_A_CHANGE
        if self._control_downloads.get(k, 0) <= 0:
            ring.heartbeat()
            return
        self._control_downloads[k] -= 1
        pixels = top.numpyArray(delayed=True)
        if pixels is not None and not ring.write(_float32(pixels), frame_id=self._frames,
                                                 flags=client.shm.FLAG_BOTTOM_LEFT):
            self._control_downloads[k] = DOWNLOADS_AFTER_A_CHANGE  # no ring yet: again next frame

    def _connected(self, index: int) -> bool:
        connectors = self.ownerComp.inputConnectors
        return index < len(connectors) and len(connectors[index].connections) > 0

    def _send_changes(self, link: client.DaemonLink) -> None:
        par = self.ownerComp.par
        values = {name: getattr(par, name).eval() for name in self.sync.specs}
        changes, resets, errors = self.sync.changes(values)
        self._set(resets)
        for error in errors:
            self._report(error)
        try:
            link.sender.send(changes)
        except OSError as e:
            self.sync.forget()  # sent again next frame
            self._report(f"cannot send to the daemon's OSC port: {e}")

    def _read_output(self, link: client.DaemonLink) -> None:
        frame = link.output.read()
        if frame is not None:
            self.frame = frame
            self.ownerComp.op("output").cook(force=True)

    def _set(self, values: dict) -> None:
        """Show values from the daemon in the parameters; a parameter the performer drives with an
        expression, an export or a bind keeps its driver."""
        par = self.ownerComp.par
        for name, value in values.items():
            target = getattr(par, name)
            if _mode(target) == "CONSTANT":
                target.val = value

    # ------------------------------------------------------------------ presets, schema, launch
    def _preset_name(self) -> str:
        name = self.ownerComp.par.Preset.eval().strip()
        if not name:
            raise ValueError("type a preset name into Preset first")
        return name

    def _take_fetches(self) -> None:
        comp = self.ownerComp
        for tag, document, error in self.fetches.poll():
            if error:
                self._report(f"could not reach the daemon's HTTP port: {error}")
            elif tag == "state":
                self._set(self.sync.adopt(document["params"]))
            elif tag == "presets":
                comp.par.Preset.menuNames = comp.par.Preset.menuLabels = document.get("presets", [])
            elif tag == "schema":
                comp.op("schema").text = json.dumps(document, indent=1)
                make_parameters(comp, self._pages(document))
                self._load_schema(document)
                self._shown.clear()

    def _launch(self, link: client.DaemonLink) -> None:
        par = self.ownerComp.par
        serving = link.output.follow()  # its heartbeat outlives it by up to 2 s: ours, just stopped, is no bar
        ended = self.launcher.process.pid if self.launcher.process and not self.launcher.running else 0
        if serving and serving != ended and not self.launcher.running:
            raise RuntimeError(f"a daemon already serves instance {link.endpoints.instance!r} "
                               f"(pid {serving}); stop it first, or choose another Instance")
        executable = _unquoted(par.Executable.eval())
        if not executable:
            raise ValueError("set sdbridge Executable to the sdbridge program (or python) of your sdbridge "
                             "environment")
        extra = [_unquoted(a) for a in shlex.split(par.Launchargs.eval(), posix=os.name != "nt")]
        self.launcher.start(client.serve_command(executable, model=par.Launchmodel.eval().strip(),
                                                 endpoints=link.endpoints, config=_unquoted(par.Config.eval()),
                                                 extra=extra))
        self.ownerComp.store(LAUNCHED_PID, self.launcher.process.pid)

    def _stop(self, link: client.DaemonLink) -> None:
        if self.launcher.running:
            self.launcher.stop()  # the next frames kill it if it has not ended within 10 s
            return
        launched = self.ownerComp.fetch(LAUNCHED_PID, 0, search=False)
        if launched and link.output.follow() == launched:  # Launch pressed before a re-initialisation
            os.kill(launched, signal.SIGTERM)  # TerminateProcess on Windows
            return
        raise RuntimeError("no daemon started by this component is running; a daemon started elsewhere is "
                           "stopped where it was started (Ctrl-C in its terminal)")

    def _pages(self, schema: dict) -> list:
        """The pages for `schema`, the launch settings as they are now."""
        par = self.ownerComp.par
        launch = {"executable": par.Executable.eval(), "model": par.Launchmodel.eval(), "config": par.Config.eval(),
                  **dataclasses.asdict(self._endpoints())}
        return parameters.pages(schema, launch)

    def _load_schema(self, schema: dict) -> None:
        self.schema = schema
        self.sync = parameters.Sync(parameters.schema_specs(schema), schema)

    # ------------------------------------------------------------------ status
    def _report(self, message: str) -> None:
        if message != self.problem[1]:
            self.problem = (time.monotonic(), message)
            print(f"sdbridge: {message}")  # the textport

    def _show(self) -> None:
        link = self.link
        telemetry = link.telemetry.poll() if link is not None else client.Telemetry()
        newest_daemon_error = telemetry.errors[-1] if telemetry.errors else (0.0, "")
        latest_error = max(self.problem, newest_daemon_error)  # the component's or the daemon's, newest
        if link is None:
            status = "not connected (see Last Error)"
        else:
            status = link.problem or parameters.status_line(telemetry, time.monotonic(), link.connected)
        shown = {
            "Status": status,
            "Fps": _number(telemetry.get("fps")),
            "Latencyms": _number(telemetry.get("latency_ms")),
            "Servedmodel": str(telemetry.get("model", "")),
            "Error": latest_error[1],
        }
        par = self.ownerComp.par
        for name, value in shown.items():
            if self._shown.get(name) != value:  # a parameter set every frame would cook its readers every frame
                getattr(par, name).val = value
                self._shown[name] = value
        if self.launcher.written != self._log_written:
            self._log_written = self.launcher.written
            self.ownerComp.op("log").text = "\n".join(self.launcher.lines)


def _float32(pixels: Any) -> Any:
    """numpyArray's pixels as a ring takes them (TouchDesigner documents floats, not their width)."""
    return pixels if pixels.dtype in client.shm.CODE_OF_DTYPE else pixels.astype("float32")


def _number(value: Any) -> float:
    try:
        return round(float(value), 1)
    except (TypeError, ValueError):
        return 0.0


def _unquoted(text: str) -> str:
    """A path as Explorer's Copy as path gives it, with its quotes, or without."""
    text = text.strip()
    return text[1:-1] if len(text) >= 2 and text[0] == text[-1] and text[0] in "\"'" else text


def _mode(par: Any) -> str:
    """A parameter's mode name: CONSTANT, EXPRESSION, EXPORT or BIND."""
    return getattr(getattr(par, "mode", None), "name", "CONSTANT")


# ---------------------------------------------------------------------------- building the parameters
SCHEMA_PAGES = (parameters.PROMPT, parameters.STREAM, parameters.MODEL, parameters.LORA, parameters.CONTROLNET)


def make_parameters(comp: Any, pages: list) -> None:
    """Create the component's custom parameter pages from `parameters.pages(...)`, or bring existing
    ones up to date: new parameters are created with their defaults, existing ones keep their value
    and its driver (expression, export, bind) and take the new range, menu and help, and parameters the
    schema no longer has (a LoRA removed from the folders) go. Used by build.py and Update Parameters."""
    existing = {page.name: page for page in comp.customPages}
    wanted_pages = {name for name, _ in pages}
    for name in SCHEMA_PAGES:
        if name in existing and name not in wanted_pages:  # the last LoRA went
            existing[name].destroy()
    for page_name, specs in pages:
        page = existing.get(page_name)
        if page is None:
            page = comp.appendCustomPage(page_name)
        wanted = {spec.name for spec in specs}
        for par in list(page.pars):
            if par.name not in wanted:
                par.destroy()
        present = {par.name: par for par in page.pars}
        for spec in specs:
            if spec.name in present:
                _configure(present[spec.name], spec)
                continue
            group = getattr(page, "append" + spec.style)(spec.name, label=spec.label)
            _configure(group[0], spec)
            if spec.help:
                try:
                    group.help = spec.help
                except (AttributeError, TypeError):  # read-only in some builds: help is a nicety
                    pass
            if spec.default is not None:
                group[0].val = spec.default  # a new parameter does not take its default by itself
    comp.sortCustomPages(*[name for name, _ in pages])


def _configure(par: Any, spec: parameters.ParSpec) -> None:
    if spec.menu or spec.style in ("Menu", "StrMenu"):
        par.menuNames = list(spec.menu)
        par.menuLabels = list(spec.menu)
    if spec.minimum is not None:
        par.min, par.clampMin = spec.minimum, True
    if spec.maximum is not None:
        par.max, par.clampMax = spec.maximum, True
    if spec.slider is not None:
        par.normMin, par.normMax = spec.slider
    if spec.default is not None:
        par.default = spec.default
    par.readOnly = spec.read_only
