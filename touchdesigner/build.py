"""Assembles the sdbridge component inside TouchDesigner and saves it as sdbridge.tox.

Do not run this file as it is: `sdbridge touchdesigner` writes sdbridge_build.py, this script with the
modules the component embeds, the daemon's schema and your launch settings filled in below. In
TouchDesigner, drag sdbridge_build.py into a network (it becomes a Text DAT), right-click it and
choose Run Script. It replaces any `sdbridge` component beside it with a new one and saves
sdbridge.tox next to your project. If a daemon answers on the HTTP port, its live schema is used
(LoRAs and presets as they are now) instead of the one filled in. docs/touchdesigner.md walks through it.

Operator types are given as strings (`comp.create("textDAT", name)`), which TouchDesigner accepts,
so the script needs nothing but the component it builds into.
"""
import json
import sys
import urllib.request

# ---- filled in by `sdbridge touchdesigner` (touchdesigner/script.py) ----
SOURCES = {}  # Text DAT name -> module source: sdb_shm, sdb_osc_codec, sdb_client, sdb_parameters, sdb_extension
SCHEMA = {"params": [], "controlnets": [], "presets": []}  # GET /api/schema of the configured daemon
STATE = {}  # its starting parameter values (GET /api/state's params)
LAUNCH = {}  # parameters.LAUNCH_DEFAULTS as `sdbridge touchdesigner` was run
# ---- end of what is filled in ----

NAME = "sdbridge"
MAX_CONTROLNETS = 8  # In TOPs are ordered by name: in1 (video), in2 ... in9 (ControlNets 0 ... 7)

# The callbacks wait for the extension (extensionsReady is False while it compiles).
FRAME_EXEC = '''# sdbridge: one call a frame, and the daemon stopped when TouchDesigner quits
def onFrameStart(frame):
    if parent().extensionsReady:
        parent().Frame()

def onExit():
    if parent().extensionsReady:
        parent().Shutdown(stop_daemon=True)
'''

PAR_EXEC = '''# sdbridge: the component's pulse parameters
def onPulse(par):
    if parent().extensionsReady:
        parent().Pulse(par.name)
'''

OUTPUT_CALLBACKS = '''# sdbridge: the Script TOP shows the newest frame the extension read
def onSetupParameters(scriptOp):
    return

def onPulse(par):
    return

def onCook(scriptOp):
    if parent().extensionsReady:
        parent().CookOutput(scriptOp)
'''


def build(parent_comp, schema, state, sources, launch, tox_path):
    """Create the component inside `parent_comp`, its parameters showing `state`, and save it;
    (component, the .tox path)."""
    controlnets = len(schema.get("controlnets", ()))
    if controlnets > MAX_CONTROLNETS:
        raise ValueError(f"the daemon has {controlnets} ControlNets; the component takes at most {MAX_CONTROLNETS}")
    old = parent_comp.op(NAME)
    if old is not None:
        old.destroy()
    comp = parent_comp.create("baseCOMP", NAME)

    def make(op_type, name, x, y, text=None):
        node = comp.create(op_type, name)
        node.nodeX, node.nodeY = x, y
        if text is not None:
            node.text = text
        return node

    for i, (name, text) in enumerate(sources.items()):  # the modules, importable by name inside
        make("textDAT", name, i * 180, 400, text)
    make("textDAT", "schema", len(sources) * 180, 400, json.dumps(schema, indent=1))
    make("textDAT", "log", len(sources) * 180 + 180, 400, "")

    video = make("inTOP", "in1", 0, 0)
    video.par.label = "Video"
    fit_to_output_size(make("nullTOP", "input_fit", 180, 0), video)
    for k in range(controlnets):
        control = make("inTOP", f"in{k + 2}", 0, -150 * (k + 1))
        control.par.label = f"ControlNet {k}"
        fit_to_output_size(make("nullTOP", f"cn{k}_fit", 180, -150 * (k + 1)), control)

    output = make("scriptTOP", "output", 400, 0)
    for docked in list(output.docked):  # the callbacks DAT TouchDesigner may have made: ours replaces it
        docked.destroy()
    callbacks = make("textDAT", "output_callbacks", 400, -150, OUTPUT_CALLBACKS)
    callbacks.dock = output
    output.par.callbacks = callbacks
    make("outTOP", "out1", 600, 0).inputConnectors[0].connect(output)

    frame_exec = make("executeDAT", "frame_exec", 600, 200, FRAME_EXEC)
    frame_exec.par.framestart = True
    frame_exec.par.exit = True
    par_exec = make("parameterexecuteDAT", "par_exec", 780, 200, PAR_EXEC)
    par_exec.par.op = ".."  # the component
    par_exec.par.pars = "*"
    par_exec.par.custom = True
    par_exec.par.builtin = False
    par_exec.par.valuechange = False
    par_exec.par.valueschanged = False
    par_exec.par.onpulse = True

    parameters = comp.op("sdb_parameters").module
    pages = parameters.pages(schema, launch)
    comp.op("sdb_extension").module.make_parameters(comp, pages)
    for name, value in parameters.td_values([s for _, specs in pages for s in specs], state).items():
        getattr(comp.par, name).val = value

    extension = "op('./sdb_extension').module.SdbridgeExt(me)"
    if hasattr(comp.par, "ext0object"):  # TouchDesigner 2023.11290 and later
        comp.par.ext0object, comp.par.ext0promote = extension, True
    else:
        comp.par.extension1, comp.par.promoteextension1 = extension, True
    comp.initializeExtensions()
    comp.par.enableexternaltox = False
    return comp, comp.save(tox_path)


def fit_to_output_size(null, source):
    """Scale `source` to the daemon's output size on the GPU, before its pixels are downloaded: a 1080p
    camera costs no more to send than a 512 x 512 frame."""
    null.inputConnectors[0].connect(source)
    null.par.outputresolution = "custom"
    null.par.resolutionw.expr = "parent().par.Width"
    null.par.resolutionh.expr = "parent().par.Height"


def live(launch, path, timeout=1.0):
    """A document of the running daemon's API (/api/schema, /api/state), or None if none answers."""
    url = f"http://{launch.get('host', '127.0.0.1')}:{launch.get('http_port', 9102)}{path}"
    direct = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # the daemon is here: no proxy
    try:
        with direct.open(url, timeout=timeout) as response:
            return json.loads(response.read().decode("utf-8"))
    except (OSError, ValueError):
        return None


def main(td, here):
    """Build beside `here` (this Text DAT) and save sdbridge.tox in the project's folder."""
    schema, state = live(LAUNCH, "/api/schema"), live(LAUNCH, "/api/state")
    source = "the running daemon" if schema and state else "the schema written into this script"
    if not (schema and state):
        schema, state = SCHEMA, {"params": STATE}
    comp, path = build(here.parent(), schema, state["params"], SOURCES, LAUNCH, f"{td.project.folder}/{NAME}.tox")
    message = f"sdbridge: built {comp.path} from {source} and saved {path}"
    print(message)
    td.ui.status = message


if "td" in sys.modules:  # Run Script inside TouchDesigner: `me` is this DAT
    main(sys.modules["td"], globals().get("me") or sys.modules["td"].me)
