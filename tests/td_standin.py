"""A stand-in for the few TouchDesigner objects the sdbridge component uses, so that the build script
and the extension run in plain Python against a real daemon. It is not TouchDesigner: it follows the
API as docs.derivative.ca states it (quoted in docs/touchdesigner.md) and is strict where TouchDesigner
is (custom parameter names, copyNumpyArray's dtypes, unknown operator parameters), so that a typo in
the component's code fails here as it would there. What it cannot show (cooking order, the GPU
download, the real parameter dialog) is for a session in TouchDesigner.

Text DATs are modules the way TouchDesigner makes them: `import client` inside one finds the sibling
DAT named `client`, and the installed `bridge` and `touchdesigner` packages are hidden while they load,
as they are absent from TouchDesigner's Python.
"""
from __future__ import annotations

import importlib.abc
import importlib.util
import re
import sys
import types
from typing import Any

import numpy as np

PAR_NAME = re.compile(r"^[A-Z][a-z0-9]*$")
# The built-in parameters the component sets, per operator type (docs.derivative.ca pages of each).
BUILTIN = {
    "baseCOMP": {"ext0object", "ext0promote", "ext0name", "enableexternaltox", "externaltox", "parentshortcut"},
    "textDAT": set(),
    "inTOP": {"label"},
    "outTOP": {"label"},
    "nullTOP": {"outputresolution", "resolutionw", "resolutionh"},
    "scriptTOP": {"callbacks", "outputresolution", "resolutionw", "resolutionh", "setuppars"},
    "executeDAT": {"active", "start", "create", "exit", "framestart", "frameend", "playstatechange"},
    "parameterexecuteDAT": {"active", "op", "pars", "valuechange", "valueschanged", "onpulse", "custom", "builtin",
                            "expressionchange", "exportchange"},
}
HIDDEN_PACKAGES = ("bridge", "touchdesigner")


class Par:
    def __init__(self, owner: "OP", name: str, style: str = "", label: str = "", page: "Page | None" = None):
        self.owner, self.name, self.style, self.label, self.page = owner, name, style, label or name, page
        self.val: Any = None
        self.expr = ""
        self.default = self.min = self.max = self.normMin = self.normMax = None
        self.clampMin = self.clampMax = self.readOnly = False
        self.menuNames: list[str] = []
        self.menuLabels: list[str] = []
        self.help = ""

    @property
    def mode(self) -> types.SimpleNamespace:  # ParMode: CONSTANT, EXPRESSION (EXPORT and BIND not modelled)
        return types.SimpleNamespace(name="EXPRESSION" if self.expr else "CONSTANT")

    def eval(self) -> Any:
        if self.expr:  # parent().par.Width / Height, and what tests drive parameters with
            value = eval(self.expr, {"parent": lambda: self.owner.parent_op, "me": self.owner})
            return value.eval() if isinstance(value, Par) else value
        if self.style == "Menu" and self.val not in self.menuNames:
            raise ValueError(f"{self.name}: {self.val!r} is not one of its menu names")
        return self.val

    def destroy(self) -> None:
        self.page.pars.remove(self)
        del self.owner.par._pars[self.name]


class ParCollection:
    def __init__(self, owner: "OP"):
        object.__setattr__(self, "_owner", owner)
        object.__setattr__(self, "_pars", {})

    def _get(self, name: str) -> Par:
        pars, owner = self._pars, self._owner
        if name not in pars:
            if name not in BUILTIN.get(owner.type, ()):
                raise AttributeError(f"{owner.type} {owner.name!r} has no parameter {name!r}")
            pars[name] = Par(owner, name)
        return pars[name]

    def __getattr__(self, name: str) -> Par:
        return self._get(name)

    def __setattr__(self, name: str, value: Any) -> None:
        self._get(name).val = value


class ParGroup(list):
    """What append* returns: the parameters of one group; its `help` is theirs."""

    @property
    def help(self) -> str:
        return self[0].help

    @help.setter
    def help(self, text: str) -> None:
        for par in self:
            par.help = text


class Page:
    def __init__(self, owner: "OP", name: str):
        self.owner, self.name, self.pars = owner, name, []

    def _append(self, style: str, name: str, label: str | None = None, replace: bool = True) -> ParGroup:
        if not PAR_NAME.match(name):
            raise ValueError(f"invalid custom parameter name {name!r}: a capital, then lowercase letters and digits")
        pars = self.owner.par._pars
        if name in pars:
            if not replace:
                raise ValueError(f"parameter {name} exists")
            pars[name].destroy()
        par = Par(self.owner, name, style, label, self)
        par.val = {"Float": 0.0, "Int": 0, "Toggle": False, "Pulse": None}.get(style, "")
        pars[name] = par
        self.pars.append(par)
        return ParGroup([par])

    def destroy(self) -> None:
        for par in list(self.pars):
            par.destroy()
        self.owner.customPages.remove(self)

    def __getattr__(self, attr: str):
        if attr.startswith("append") and attr[6:] in ("Float", "Int", "Str", "StrMenu", "Menu", "Toggle", "Pulse", "File"):
            return lambda name, label=None, replace=True: self._append(attr[6:], name, label, replace)
        raise AttributeError(attr)


class Connector:
    def __init__(self, owner: "OP"):
        self.owner, self.connections = owner, []

    def connect(self, other: "OP") -> None:
        self.connections = [other]


class OP:
    def __init__(self, op_type: str, name: str, parent_op: "OP | None"):
        self.type, self.name, self.parent_op = op_type, name, parent_op
        self.children: dict[str, OP] = {}
        self.par = ParCollection(self)
        self.nodeX = self.nodeY = 0
        self.text = ""
        self.inputConnectors = [Connector(self)]
        self.totalCooks = 0
        self.pixels: np.ndarray | None = None  # an In TOP's picture as fed; a TOP's as of its last cook
        self.version = 0  # In TOPs: how many pictures were fed
        self._seen = -1  # the source version this TOP last cooked
        self._download: np.ndarray | None = None  # what the next numpyArray(delayed=True) hands back
        self.docked: list[OP] = []
        self.dock: OP | None = None
        self._storage: dict[str, Any] = {}
        self._module: types.ModuleType | None = None

    @property
    def path(self) -> str:
        return (self.parent_op.path.rstrip("/") if self.parent_op else "") + "/" + self.name

    def parent(self) -> "OP":
        return self.parent_op

    def op(self, path: str) -> "OP | None":
        if path == "..":
            return self.parent_op
        return self.children.get(path.removeprefix("./"))

    def create(self, op_type: str, name: str) -> "OP":
        if op_type not in BUILTIN:
            raise ValueError(f"the stand-in has no {op_type}")
        node = (COMP if op_type.endswith("COMP") else OP)(op_type, name, self)
        self.children[name] = node
        return node

    def destroy(self) -> None:
        del self.parent_op.children[self.name]

    # DATs
    @property
    def module(self) -> types.ModuleType:
        if self._module is None:
            self._module = load_dat_module(self)
        return self._module

    def run_callback(self, function: str, *args: Any) -> Any:
        """Call a function of a callbacks DAT the way TouchDesigner does: `parent()` is the component."""
        namespace = {"parent": lambda: self.parent_op, "me": self}
        exec(compile(self.text, self.path, "exec", dont_inherit=True), namespace)
        return namespace[function](*args)

    def store(self, key: str, value: Any) -> None:
        self._storage[key] = value

    def fetch(self, key: str, default: Any = None, search: bool = True) -> Any:
        return self._storage.get(key, default)

    # TOPs: they cook when asked (pull), and only when their source changed, unless forced
    def numpyArray(self, delayed: bool = False) -> np.ndarray | None:
        """The picture as of the last cook; delayed: the one of the previous delayed call (None first)."""
        current = None if self.pixels is None else np.ascontiguousarray(self.pixels, np.float32)
        if not delayed:
            return current
        handed, self._download = self._download, current
        return handed

    def cook(self, force: bool = False) -> None:
        if self.type == "scriptTOP":
            self.totalCooks += 1
            self.par.callbacks.val.run_callback("onCook", self)
            return
        source = self.inputConnectors[0].connections
        upstream = source[0] if source else None
        if upstream is not None and (force or upstream.version != self._seen):
            self._seen = upstream.version
            self.pixels = upstream.pixels
            self.totalCooks += 1

    def copyNumpyArray(self, array: np.ndarray) -> None:
        if array.dtype not in (np.uint8, np.uint16, np.float32) or array.ndim != 3 or not 1 <= array.shape[2] <= 4:
            raise TypeError(f"copyNumpyArray takes (h, w, 1..4) uint8, uint16 or float32, not {array.shape} {array.dtype}")
        self.pixels = array.copy()


class COMP(OP):
    def __init__(self, op_type: str, name: str, parent_op: "OP | None"):
        super().__init__(op_type, name, parent_op)
        self.customPages: list[Page] = []
        self.extensions: list[Any] = []
        self.extensionsReady = False
        self.saved_to = ""

    @property
    def customPars(self) -> list[Par]:
        return [p for page in self.customPages for p in page.pars]

    @property
    def inputConnectors(self) -> list[Connector]:  # one per In TOP, in the order of their names
        return [self._inputs.setdefault(name, Connector(self)) for name in
                sorted(n for n, c in self.children.items() if c.type == "inTOP")]

    @inputConnectors.setter
    def inputConnectors(self, _value: Any) -> None:
        self._inputs: dict[str, Connector] = {}

    def appendCustomPage(self, name: str) -> Page:
        page = Page(self, name)
        self.customPages.append(page)
        return page

    def sortCustomPages(self, *names: str) -> None:
        order = {name: i for i, name in enumerate(names)}
        self.customPages.sort(key=lambda page: order.get(page.name, len(order)))

    def initializeExtensions(self) -> None:
        expression = self.par.ext0object.eval()
        self.extensions = [eval(expression, {"op": self.op, "me": self})]
        self.extensionsReady = True

    def save(self, path: str) -> str:
        self.saved_to = path
        return path

    def __getattr__(self, name: str) -> Any:  # promoted extension members: capitalized ones
        if name[:1].isupper() and self.par.ext0promote.val:
            for extension in self.__dict__.get("extensions", ()):
                if hasattr(extension, name):
                    return getattr(extension, name)
        raise AttributeError(name)

    # what a performer does
    def feed(self, index: int, pixels: np.ndarray | None) -> None:
        """Wire (or unwire, with None) a TOP showing `pixels` to input `index`."""
        name = sorted(n for n, c in self.children.items() if c.type == "inTOP")[index]
        self.children[name].pixels = pixels
        self.children[name].version += 1
        self.inputConnectors[index].connections = [] if pixels is None else ["a TOP"]

    def frame(self) -> None:
        self.op("frame_exec").run_callback("onFrameStart", 0)

    def pulse(self, name: str) -> None:
        self.op("par_exec").run_callback("onPulse", getattr(self.par, name))


class _DatFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """While a DAT module loads: sibling DATs import by name; the sdbridge packages are not there."""

    def __init__(self, comp: OP):
        self.comp = comp

    def find_spec(self, name: str, path: Any, target: Any = None):
        if name.split(".")[0] in HIDDEN_PACKAGES:
            raise ModuleNotFoundError(f"No module named {name!r} (as in TouchDesigner's Python)")
        dat = self.comp.op(name)
        if dat is not None and dat.type == "textDAT":
            return importlib.util.spec_from_loader(name, self)
        return None

    def create_module(self, spec):
        return self.comp.op(spec.name).module

    def exec_module(self, module):
        pass


def load_dat_module(dat: OP) -> types.ModuleType:
    module = types.ModuleType(dat.name)
    module.__file__ = dat.path
    dat._module = module
    hidden = {name: sys.modules.pop(name) for name in list(sys.modules) if name.split(".")[0] in HIDDEN_PACKAGES}
    finder = _DatFinder(dat.parent_op)
    sys.meta_path.insert(0, finder)
    siblings = {name: sys.modules.pop(name, None) for name in dat.parent_op.children}
    try:  # not registered in sys.modules while it runs: TouchDesigner may not register DAT modules
        exec(compile(dat.text, dat.path, "exec", dont_inherit=True), module.__dict__)
    except BaseException:
        dat._module = None
        raise
    finally:
        sys.meta_path.remove(finder)
        for name in dat.parent_op.children:  # DAT modules live in their component, not in sys.modules
            sys.modules.pop(name, None)
        sys.modules.update({k: v for k, v in siblings.items() if v is not None})
        sys.modules.update(hidden)
    return module


def network() -> COMP:
    """An empty network to build into (what /project1 is)."""
    root = COMP("baseCOMP", "project1", None)
    return root
