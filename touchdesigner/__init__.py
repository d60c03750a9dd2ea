"""sdbridge inside TouchDesigner: the client library (client), the component's parameters and the
logic its extension runs (parameters), the extension class (extension), the script that assembles
sdbridge.tox inside TouchDesigner (build) and what writes that script (script).

Every module but `extension` and `build` runs in plain Python, which is how the tests run them; the
.tox embeds them, with bridge/shm and bridge/osc_codec, as Text DATs (docs/touchdesigner.md).
"""
