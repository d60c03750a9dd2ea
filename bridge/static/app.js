/*
 * sdbridge web control page.
 *
 * Owns: building the controls from the parameter schema (GET /api/schema), talking to the daemon over
 * one WebSocket (/ws, PROTOCOL.md section 3) and showing its output frames and telemetry.
 * Knows no parameter by name: which widget and which section a parameter gets follows from its type,
 * range, choices and name prefix in the schema, so a parameter added to bridge/params.py appears here
 * by itself.
 *
 * Latency rules the code below keeps:
 *  - a slider sends while it moves, at most one `set` per SEND_INTERVAL_MS; values that come in
 *    meanwhile replace each other, so a drag never builds a backlog, and its last value is always sent;
 *  - the newest output frame wins: while one frame decodes, later ones replace each other;
 *  - a state push never moves a control the user is holding (dragging, typing in) or whose change the
 *    daemon has not confirmed yet, so the page does not fight the performer.
 *
 * Everything lives in this closure; `window.sdbridge` is the one name it leaves behind, for the
 * browser console.
 */
"use strict";

(() => {
  // ------------------------------------------------------------------------------------------ constants

  const SEND_INTERVAL_MS = 40;        // at most one `set` per this while a slider moves
  const TEXT_IDLE_MS = 350;           // a prompt is sent once typing pauses this long (or on Enter/blur)
  const RECONNECT_MIN_MS = 250;
  const RECONNECT_MAX_MS = 5000;
  const RANDOMISABLE_MAX = 1e6;       // int parameters whose range reaches this are seeds: box + 🎲, no slider
  const RECORD_TITLE = "Record the output to a video file in the daemon's recordings folder";
  const SLIDER_STEPS = 500;           // a float slider has about this many steps (rounded to a power of 10)
  const ERRORS_KEPT = 6;
  const SUBSCRIPTION = {topics: ["state", "telemetry", "frames"], frames: {encoding: "jpeg", max_fps: 15}};

  // Binary frame header (PROTOCOL.md section 3): 32 bytes, little-endian.
  const FRAME = {headerBytes: 32, magic: "SDBF", kindOutput: 2, mime: {1: "image/jpeg", 2: "image/png"}};

  // Section titles; a section not named here (a new parameter family) is titled by its key.
  const SECTION_TITLES = {
    prompt: "Prompt", controls: "Controls", lora: "LoRA", controlnet: "ControlNet",
    model: "Model", advanced: "Advanced",
  };

  // ------------------------------------------------------------------------------------------ helpers

  const byId = (id) => document.getElementById(id);

  /** A new element: `attrs` become attributes (`dataset` and `text` are special), children are appended. */
  function h(tag, attrs = {}, ...children) {
    const node = document.createElement(tag);
    for (const [key, value] of Object.entries(attrs)) {
      if (value === undefined || value === null || value === false) continue;
      if (key === "dataset") Object.assign(node.dataset, value);
      else if (key === "text") node.textContent = value;
      else node.setAttribute(key, value === true ? "" : String(value));
    }
    node.append(...children);
    return node;
  }

  const sameValue = (a, b) => JSON.stringify(a) === JSON.stringify(b);

  /** A label from a parameter name: underscores as spaces; in a family (lora/<name>,
   * controlnet/<k>/<field>) the part after the prefix, kept as written since a LoRA's name is a file's. */
  function labelOf(param) {
    const slash = param.name.indexOf("/");
    return slash > 0 ? param.name.slice(slash + 1).replace(/\//g, " · ") : param.name.replace(/_/g, " ");
  }

  function randomInt(low, high) {
    const [r] = crypto.getRandomValues(new Uint32Array(1));
    return low + (r % (high - low + 1));
  }

  async function fetchJSON(path) {
    const response = await fetch(path, {cache: "no-store"});
    if (response.status === 401) throw new Error("this daemon wants its token: open the link its log shows");
    if (!response.ok) throw new Error(`${path}: HTTP ${response.status}`);
    return response.json();
  }

  // ------------------------------------------------------------------------------------------ schema → layout

  const isRanged = (p) => typeof p.min === "number" && typeof p.max === "number";

  /** The widget a parameter gets, from its schema entry alone. */
  function widgetOf(p) {
    if (p.type === "list") return "json";
    if (p.type === "bool") return "checkbox";
    if (p.choices) return "select";
    if (p.type === "str") return p.options || !p.live ? "text" : "textarea";
    if (p.type === "int" && typeof p.max === "number" && p.max >= RANDOMISABLE_MAX) return "randomisable";
    return isRanged(p) ? "slider" : "number";
  }

  /** The section a parameter sits in: its name prefix for families (lora/..., controlnet/...), else by kind. */
  function sectionOf(p) {
    const slash = p.name.indexOf("/");
    if (slash > 0) return p.name.slice(0, slash);
    if (p.type === "list") return "advanced";
    if (!p.live) return "model";
    return widgetOf(p) === "textarea" ? "prompt" : "controls";
  }

  /** Section keys in page order: prompts, plain controls, families in schema order, model, advanced. */
  function sectionOrder(params) {
    const keys = [...new Set(params.map(sectionOf))];
    const first = ["prompt", "controls"], last = ["model", "advanced"];
    const families = keys.filter((k) => !first.includes(k) && !last.includes(k));
    return [...first, ...families, ...last].filter((k) => keys.includes(k));
  }

  /** A float slider's step: a power of ten giving about SLIDER_STEPS steps; an int's: its multiple_of. */
  function stepOf(p) {
    if (p.type === "int") return p.multiple_of || 1;
    return 10 ** Math.floor(Math.log10((p.max - p.min) / SLIDER_STEPS));
  }

  const decimalsOf = (step) => Math.max(0, -Math.floor(Math.log10(step)));

  function formatNumber(value, decimals) {
    if (typeof value !== "number") return String(value);
    const fixed = value.toFixed(decimals);
    return Math.abs(Number(fixed) - value) < 1e-9 ? fixed : String(value); // never hide typed precision
  }

  // ------------------------------------------------------------------------------------------ controls

  /*
   * A control is one parameter's widget: { name, param, field (its wrapper element), show(value),
   * isBusy() }. It reports the user's changes through `ui.commit(name, value)` (sent at once, throttled)
   * or `ui.commitSoon(name, commitNow)` (commitNow runs once typing pauses), asks for the daemon's value
   * back with `ui.refresh(name)` when the user lets go, and reports local mistakes through `ui.fail`.
   */

  function fieldFor(p, id, ...content) {
    const label = h("label", {for: id, text: labelOf(p)});
    return h("div", {class: `field ${widgetOf(p)}`, title: p.doc, dataset: {field: p.name}},
      label, ...content, h("small", {class: "doc", text: p.doc}));
  }

  /** A text entry sent on Enter and on blur; `parse` turns its text into a value or throws. */
  function committedOnEnter(input, p, ui, parse, {multiline = false} = {}) {
    let committedText; // what was last sent (or refused) since the box got focus: Enter then blur acts once
    const commit = () => {
      if (input.value === committedText) return;
      committedText = input.value;
      let value;
      try {
        value = parse(input.value);
      } catch (err) {
        ui.fail(p.name, `${p.name}: ${err.message}`);
        return;
      }
      ui.commit(p.name, value);
    };
    input.addEventListener("keydown", (event) => {
      // In a textarea Shift+Enter still makes a new line; prompts rarely want one.
      if (event.key === "Enter" && !(multiline && event.shiftKey) && !event.isComposing) {
        event.preventDefault();
        commit();
      }
    });
    input.addEventListener("change", commit);
    input.addEventListener("focus", () => { committedText = undefined; });
    return commit;
  }

  const hasFocus = (...nodes) => nodes.includes(document.activeElement);

  function sliderControl(p, ui) {
    const id = `param-${p.name}`, step = stepOf(p), decimals = decimalsOf(step);
    const toValue = (text) => (p.type === "int" ? Math.round(Number(text)) : Number(Number(text).toFixed(decimals)));
    const range = h("input", {type: "range", id, min: p.min, max: p.max, step, dataset: {param: p.name}});
    // The number beside the slider also takes a typed value; the daemon checks its range.
    const box = h("input", {type: "number", class: "value", min: p.min, max: p.max, step: "any",
      inputmode: p.type === "int" ? "numeric" : "decimal", "aria-label": `${labelOf(p)} value`,
      dataset: {valueFor: p.name}});
    let dragging = false, valueAtPress;

    const release = () => {
      dragging = false;
      window.removeEventListener("pointerup", release);
      window.removeEventListener("pointercancel", release);
      // Commit the final value here, not only on `change`, which may come after this refresh would have
      // put the daemon's (old) value back under the finger of a non-live slider.
      if (range.value !== valueAtPress) ui.commit(p.name, toValue(range.value));
      ui.refresh(p.name);
    };
    range.addEventListener("pointerdown", () => {
      dragging = true;
      valueAtPress = range.value;
      window.addEventListener("pointerup", release);
      window.addEventListener("pointercancel", release);
    });
    range.addEventListener("input", () => {
      const value = toValue(range.value);
      box.value = formatNumber(value, decimals);
      if (p.live) ui.commit(p.name, value); // live parameters follow the drag; the others wait for release
    });
    range.addEventListener("change", () => ui.commit(p.name, toValue(range.value)));
    committedOnEnter(box, p, ui, (text) => {
      if (text.trim() === "" || !Number.isFinite(Number(text))) throw new Error("expected a number");
      return Number(text);
    });
    box.addEventListener("blur", () => ui.refresh(p.name));

    const field = fieldFor(p, id, box, range);
    // Double-clicking the name puts the default back: quicker than finding 0.5 with a finger.
    field.querySelector("label").addEventListener("dblclick", () => ui.commit(p.name, p.default));
    return {
      field,
      show(value) {
        range.value = value;
        box.value = formatNumber(value, decimals);
      },
      isBusy: () => dragging || hasFocus(box),
    };
  }

  function randomisableControl(p, ui) {
    const id = `param-${p.name}`;
    const input = h("input", {type: "number", id, min: p.min, max: p.max, step: 1, inputmode: "numeric",
      dataset: {param: p.name}});
    const dice = h("button", {type: "button", class: "dice", title: `A random ${labelOf(p)}`,
      "aria-label": `Random ${labelOf(p)}`, dataset: {randomise: p.name}, text: "🎲"});
    committedOnEnter(input, p, ui, (text) => {
      const value = Number(text);
      if (text.trim() === "" || !Number.isInteger(value)) throw new Error("expected a whole number");
      return value;
    });
    input.addEventListener("blur", () => ui.refresh(p.name));
    dice.addEventListener("click", () => {
      const value = randomInt(Math.max(p.min ?? 0, 0), p.max);
      input.value = value;
      ui.commit(p.name, value);
    });
    return {
      field: fieldFor(p, id, h("div", {class: "row"}, input, dice)),
      show(value) { input.value = value; },
      isBusy: () => hasFocus(input),
    };
  }

  function numberControl(p, ui) {
    const id = `param-${p.name}`;
    const input = h("input", {type: "number", id, min: p.min, max: p.max, step: "any", dataset: {param: p.name}});
    committedOnEnter(input, p, ui, (text) => {
      if (text.trim() === "" || !Number.isFinite(Number(text))) throw new Error("expected a number");
      return Number(text);
    });
    input.addEventListener("blur", () => ui.refresh(p.name));
    return {field: fieldFor(p, id, input), show(value) { input.value = value; }, isBusy: () => hasFocus(input)};
  }

  function selectControl(p, ui) {
    const id = `param-${p.name}`;
    const select = h("select", {id, dataset: {param: p.name}},
      ...p.choices.map((choice) => h("option", {value: choice, text: choice})));
    select.addEventListener("change", () => ui.commit(p.name, select.value));
    // A choice is made in one gesture: nothing to protect, so state pushes always show.
    return {field: fieldFor(p, id, select), show(value) { select.value = value; }, isBusy: () => false};
  }

  function checkboxControl(p, ui) {
    const id = `param-${p.name}`;
    const box = h("input", {type: "checkbox", id, role: "switch", dataset: {param: p.name}});
    box.addEventListener("change", () => ui.commit(p.name, box.checked));
    return {field: fieldFor(p, id, box), show(value) { box.checked = Boolean(value); }, isBusy: () => false};
  }

  /** Prompts: sent when typing pauses, on Enter and on blur; never overwritten while focused. */
  function textareaControl(p, ui) {
    const id = `param-${p.name}`;
    const area = h("textarea", {id, rows: 2, spellcheck: "false", autocomplete: "off", dataset: {param: p.name}});
    const commitNow = committedOnEnter(area, p, ui, (text) => text, {multiline: true});
    area.addEventListener("input", () => ui.commitSoon(p.name, commitNow));
    area.addEventListener("blur", () => ui.refresh(p.name));
    return {field: fieldFor(p, id, area), show(value) { area.value = value; }, isBusy: () => hasFocus(area)};
  }

  /** A one-line text box (with suggestions where the schema lists `options`), sent on Enter or blur. */
  function textControl(p, ui) {
    const id = `param-${p.name}`;
    const listId = p.options ? `options-${p.name}` : undefined;
    const input = h("input", {type: "text", id, list: listId, spellcheck: "false", autocomplete: "off",
      autocapitalize: "off", dataset: {param: p.name}});
    committedOnEnter(input, p, ui, (text) => text);
    input.addEventListener("blur", () => ui.refresh(p.name));
    const extras = listId ? [h("datalist", {id: listId}, ...p.options.map((o) => h("option", {value: o})))] : [];
    return {field: fieldFor(p, id, input, ...extras), show(value) { input.value = value; },
      isBusy: () => hasFocus(input)};
  }

  /** List parameters as JSON text; a typo is reported here, a bad value by the daemon. */
  function jsonControl(p, ui) {
    const id = `param-${p.name}`;
    const entry = p.entry || [];
    const placeholder = entry.length > 1 ? `[[${entry.join(", ")}], …]` : `[${entry[0] || ""}, …]`;
    const input = h("input", {type: "text", id, class: "json", placeholder, spellcheck: "false",
      autocomplete: "off", autocapitalize: "off", dataset: {param: p.name}});
    committedOnEnter(input, p, ui, (text) => {
      const value = JSON.parse(text.trim() === "" ? "[]" : text);
      if (!Array.isArray(value)) throw new Error("expected a JSON list, e.g. " + placeholder);
      return value;
    });
    input.addEventListener("blur", () => ui.refresh(p.name));
    return {field: fieldFor(p, id, input), show(value) { input.value = JSON.stringify(value); },
      isBusy: () => hasFocus(input)};
  }

  const BUILDERS = {
    slider: sliderControl, randomisable: randomisableControl, number: numberControl, select: selectControl,
    checkbox: checkboxControl, textarea: textareaControl, text: textControl, json: jsonControl,
  };

  /** Every control, in sections, into `container`; returns Map name → control. */
  function buildControls(container, params, ui) {
    const controls = new Map();
    const sections = new Map();
    for (const key of sectionOrder(params)) {
      const body = h("div", {class: "section-body"});
      const section = h("details", {class: "section", open: key !== "advanced", dataset: {section: key}},
        h("summary", {text: SECTION_TITLES[key] || key}), body);
      sections.set(key, body);
      container.append(section);
    }
    for (const p of params) {
      const control = {name: p.name, param: p, ...BUILDERS[widgetOf(p)](p, ui)};
      sections.get(sectionOf(p)).append(control.field);
      controls.set(p.name, control);
    }
    return controls;
  }

  /**
   * The presets section: a button per preset recalls it (one tap on a phone), or morphs to it over the
   * seconds set (above 0); a name and Save store the whole state under that name; Record and Snapshot
   * run the show commands of the same names. `send(message)` sends a preset or command message; the
   * list comes from the schema and then from each preset ack.
   */
  class PresetPanel {
    constructor(send) {
      this.send = send;
      this.seconds = h("input", {type: "number", id: "morph-seconds", min: 0, max: 600, step: 0.5, value: 0,
        "aria-label": "Morph seconds"});
      this.record = h("button", {type: "button", id: "record", text: "Record",
        title: RECORD_TITLE});
      this.record.addEventListener("click", () => this.send({type: "command",
        command: this.recording ? "/record/stop" : "/record/start", args: []}));
      const snapshot = h("button", {type: "button", id: "snapshot", text: "Snapshot",
        title: "Save the frame on screen as a PNG holding every parameter"});
      snapshot.addEventListener("click", () => this.send({type: "command", command: "/snapshot", args: []}));
      this.recording = false;
      this.list = h("div", {class: "preset-list", id: "preset-list"});
      this.name = h("input", {type: "text", id: "preset-name", maxlength: 64, placeholder: "name",
        autocomplete: "off", "aria-label": "Preset name"});
      const save = h("button", {type: "button", id: "preset-save", text: "Save"});
      save.addEventListener("click", () => this.save());
      this.name.addEventListener("keydown", (event) => {
        if (event.key === "Enter" && !event.isComposing) this.save();
      });
      this.section = h("details", {class: "section", open: true, dataset: {section: "presets"}},
        h("summary", {text: "Presets"}),
        h("div", {class: "section-body"}, this.list,
          h("div", {class: "field preset-save", title: "Store every parameter under this name (a TOML file in the daemon's presets folder)"},
            this.name, save),
          h("div", {class: "field preset-morph", title: "Above 0, a preset button eases to the preset over this many seconds"},
            h("label", {for: "morph-seconds", text: "Morph over (s)"}), this.seconds),
          h("div", {class: "field show-actions"}, this.record, snapshot)));
    }

    /** Telemetry `recording`: the file being recorded, "" when none. */
    showRecording(path) {
      this.recording = Boolean(path);
      this.record.textContent = this.recording ? "Stop recording" : "Record";
      this.record.classList.toggle("recording", this.recording);
      this.record.title = this.recording ? `Recording to ${path}` : RECORD_TITLE;
    }

    recall(name) {
      const seconds = Number(this.seconds.value);
      if (seconds > 0) this.send({type: "command", command: "/preset/morph", args: [name, seconds]});
      else this.send({type: "preset", recall: name});
    }

    show(names) {
      this.list.replaceChildren(...names.map((name) => {
        const button = h("button", {type: "button", class: "preset", dataset: {preset: name}, text: name,
          title: `Recall ${name}`});
        button.addEventListener("click", () => this.recall(name));
        return button;
      }));
      if (!names.length) this.list.append(h("p", {class: "muted", text: "No presets yet: name the current look and save it."}));
    }

    save() {
      const name = this.name.value.trim();
      if (name) this.send({type: "preset", save: name});
    }
  }

  // ------------------------------------------------------------------------------------------ sending

  /**
   * The user's changes on their way to the daemon. A `set` goes out at most every SEND_INTERVAL_MS
   * (and not while the socket still holds unsent bytes); changes made meanwhile are merged, newest value
   * per parameter, so a slider drag sends its latest position, never a queue of old ones. An ack
   * releases what waits as soon as the interval allows; the interval, not the ack, paces the sets, so
   * a slow link adds no round trip per step of a drag (the daemon applies sets in order, cheaply).
   * A parameter counts as unconfirmed from the user's change until a state at least as new as its ack
   * has arrived: until then state pushes leave its control alone.
   */
  class Outbox {
    /**
     * `send(message)` returns false when not connected; `bufferedAmount()` is the socket's unsent bytes;
     * `newId()` numbers requests (one sequence for the whole connection, so replies cannot be confused).
     */
    constructor({send, bufferedAmount, newId}) {
      Object.assign(this, {send, bufferedAmount, newId});
      this.pending = new Map();      // name → newest value not sent yet
      this.inFlight = new Map();     // set id → names it carried
      this.awaiting = new Map();     // name → state version that will include the user's change
      this.debounce = new Map();     // name → timer of a text parameter being typed
      this.lastSent = new Map();     // name → value most recently sent
      this.lastSentAt = -Infinity;
      this.timer = null;
    }

    /** Queue `value` for `name`; it goes out with the next `set`. */
    put(name, value) {
      this.cancelTyping(name);
      // A slider's `change` repeats its last `input`: while that is unconfirmed, sending it again is noise.
      if (!this.pending.has(name) && this.unconfirmed(name) && sameValue(this.lastSent.get(name), value)) return;
      this.pending.set(name, value);
      this.schedule();
    }

    /** Queue `value` once typing has paused for TEXT_IDLE_MS (`commitNow` sends it through the usual path). */
    putSoon(name, commitNow) {
      this.cancelTyping(name);
      this.debounce.set(name, setTimeout(() => { this.debounce.delete(name); commitNow(); }, TEXT_IDLE_MS));
    }

    cancelTyping(name) {
      clearTimeout(this.debounce.get(name));
      this.debounce.delete(name);
    }

    schedule() {
      if (this.timer !== null || this.pending.size === 0) return;
      const wait = this.lastSentAt + SEND_INTERVAL_MS - performance.now();
      if (wait <= 0 && this.bufferedAmount() === 0) {
        this.flush();
      } else {
        this.timer = setTimeout(() => { this.timer = null; this.schedule(); }, Math.max(wait, SEND_INTERVAL_MS / 4));
      }
    }

    /** Send what waits at once, throttle or not (what comes next must reach the daemon after it). */
    sendNow() {
      clearTimeout(this.timer);
      this.timer = null;
      if (this.pending.size) this.flush();
    }

    flush() {
      const params = Object.fromEntries(this.pending);
      const id = this.newId();
      this.pending.clear();
      if (!this.send({type: "set", id, params})) return; // offline: dropped; the daemon's state shows again
      this.inFlight.set(id, Object.keys(params));
      for (const [name, value] of Object.entries(params)) this.lastSent.set(name, value);
      this.lastSentAt = performance.now();
    }

    /** The reply to set `id` arrived; returns the names it carried. `version` is the acked state's. */
    settle(id, version) {
      const names = this.inFlight.get(id) || [];
      this.inFlight.delete(id);
      for (const name of names) {
        if (version === undefined) this.awaiting.delete(name); // refused: nothing to wait for
        else this.awaiting.set(name, Math.max(version, this.awaiting.get(name) ?? 0));
      }
      this.schedule();
      return names;
    }

    /** A state of `version` arrived: parameters waiting for it are confirmed. */
    confirm(version) {
      for (const [name, wanted] of this.awaiting) if (version >= wanted) this.awaiting.delete(name);
    }

    /** True while the daemon has not confirmed the user's latest change to `name`. */
    unconfirmed(name) {
      if (this.pending.has(name) || this.debounce.has(name) || this.awaiting.has(name)) return true;
      for (const names of this.inFlight.values()) if (names.includes(name)) return true;
      return false;
    }

    /** The connection dropped: what was not sent is dropped too (the daemon's state wins on reconnect). */
    reset() {
      clearTimeout(this.timer);
      this.timer = null;
      for (const name of [...this.debounce.keys()]) this.cancelTyping(name);
      this.pending.clear();
      this.inFlight.clear();
      this.awaiting.clear();
      this.lastSent.clear();
    }
  }

  // ------------------------------------------------------------------------------------------ preview

  /** Shows output frames in <img id="preview">; the newest frame wins while one is still decoding. */
  class Preview {
    constructor(img, info) {
      this.img = img;
      this.info = info;
      this.shownUrl = null;
      this.loadingUrl = null;
      this.next = null;
      img.addEventListener("load", () => this.done(true));
      img.addEventListener("error", () => this.done(false));
    }

    /** One binary WebSocket message; anything but an encoded output frame is ignored. */
    take(buffer) {
      if (buffer.byteLength <= FRAME.headerBytes) return;
      const view = new DataView(buffer);
      const magic = String.fromCharCode(...new Uint8Array(buffer, 0, 4));
      const mime = FRAME.mime[view.getUint8(8)];
      if (magic !== FRAME.magic || view.getUint8(6) !== FRAME.kindOutput || !mime) return;
      this.next = {
        blob: new Blob([new Uint8Array(buffer, FRAME.headerBytes)], {type: mime}),
        width: view.getUint32(12, true),
        height: view.getUint32(16, true),
        frameId: view.getBigUint64(24, true),
      };
      if (this.loadingUrl === null) this.showNext();
    }

    showNext() {
      const frame = this.next;
      this.next = null;
      this.loadingUrl = URL.createObjectURL(frame.blob);
      this.img.src = this.loadingUrl;
      this.info.textContent = `${frame.width}×${frame.height} · frame ${frame.frameId}`;
    }

    done(ok) {
      if (this.loadingUrl === null) return;
      if (this.shownUrl) URL.revokeObjectURL(this.shownUrl); // only now: the old one stayed on screen till here
      this.shownUrl = ok ? this.loadingUrl : null;
      if (!ok) URL.revokeObjectURL(this.loadingUrl);
      this.loadingUrl = null;
      if (this.next) this.showNext();
    }
  }

  // ------------------------------------------------------------------------------------------ connection

  /** One WebSocket to /ws that reconnects with exponential backoff; binary messages are frames. */
  class Connection {
    constructor({onOpen, onMessage, onFrame, onClose}) {
      this.handlers = {onOpen, onMessage, onFrame, onClose};
      this.ws = null;
      this.delay = RECONNECT_MIN_MS;
    }

    open() {
      const ws = new WebSocket(`${location.protocol === "https:" ? "wss" : "ws"}://${location.host}/ws`);
      ws.binaryType = "arraybuffer";
      ws.addEventListener("open", () => {
        this.delay = RECONNECT_MIN_MS;
        this.handlers.onOpen();
      });
      ws.addEventListener("message", ({data}) => {
        if (typeof data !== "string") return this.handlers.onFrame(data);
        let message;
        try {
          message = JSON.parse(data);
        } catch {
          return console.warn("sdbridge: a message that is not JSON", data);
        }
        this.handlers.onMessage(message);
      });
      ws.addEventListener("close", () => {
        if (this.ws !== ws) return;
        this.ws = null;
        const delay = this.delay * (0.8 + 0.4 * Math.random()); // jitter: many phones, one daemon restart
        this.delay = Math.min(this.delay * 2, RECONNECT_MAX_MS);
        this.handlers.onClose(delay);
        setTimeout(() => this.open(), delay);
      });
      this.ws = ws;
    }

    send(message) {
      if (this.ws?.readyState !== WebSocket.OPEN) return false;
      this.ws.send(JSON.stringify(message));
      return true;
    }

    get bufferedAmount() {
      return this.ws?.bufferedAmount ?? 0;
    }
  }

  // ------------------------------------------------------------------------------------------ the page

  class ControlPage {
    constructor() {
      this.schema = null;
      this.controls = new Map();
      this.state = {};
      this.version = 0;              // state_version of this.state
      this.nextRequestId = 1;
      this.everConnected = false;
      this.schemaLoad = null;        // the schema fetch under way, if any
      this.unknownNames = "";        // state names the controls lack, last time the schema was fetched for them
      this.preview = new Preview(byId("preview"), byId("frame-info"));
      // A preset saved or recalled comes after the changes the user made before it: what waits in the
      // outbox goes first, or a slider value still held back by the throttle would land after a recall.
      this.presets = new PresetPanel((message) => {
        this.outbox.sendNow();
        this.connection.send({...message, id: this.nextRequestId++});
      });
      this.connection = new Connection({
        onOpen: () => this.connected(),
        onMessage: (message) => this.receive(message),
        onFrame: (buffer) => this.preview.take(buffer),
        onClose: (delay) => this.disconnected(delay),
      });
      this.outbox = new Outbox({
        send: (message) => this.connection.send(message),
        bufferedAmount: () => this.connection.bufferedAmount,
        newId: () => this.nextRequestId++,
      });
      // What the controls call; see the comment above the control builders.
      this.ui = {
        commit: (name, value) => {
          delete this.controls.get(name)?.field.dataset.error; // a new try: the old complaint is moot
          this.outbox.put(name, value);
        },
        commitSoon: (name, commitNow) => this.outbox.putSoon(name, commitNow),
        refresh: (name) => this.refresh(name),
        fail: (name, message) => this.showError(message, [name]),
      };
    }

    async start() {
      await this.loadSchema();
      this.connection.open();
    }

    /** Fetch the schema (retrying until the daemon answers) and build the controls if it changed.
     * One fetch at a time: callers while one runs share it. */
    loadSchema() {
      if (this.schemaLoad) return this.schemaLoad;
      this.schemaLoad = (async () => {
        for (let delay = RECONNECT_MIN_MS; ; delay = Math.min(delay * 2, RECONNECT_MAX_MS)) {
          try {
            const schema = await fetchJSON("/api/schema");
            if (!this.schema || !sameValue(schema.params, this.schema.params)) this.build(schema);
            this.schema = schema;
            return;
          } catch (err) {
            this.setStatus("disconnected", `no schema (${err.message})`);
            await new Promise((resolve) => setTimeout(resolve, delay));
          }
        }
      })().finally(() => { this.schemaLoad = null; });
      return this.schemaLoad;
    }

    build(schema) {
      const container = byId("controls");
      container.replaceChildren();
      this.controls = buildControls(container, schema.params, this.ui);
      container.prepend(this.presets.section);
      this.presets.show(schema.presets || []);
      byId("instance").textContent = `${schema.instance} · OSC ${schema.osc_port}`;
      document.title = `sdbridge · ${schema.instance}`;
      for (const name of this.controls.keys()) this.refresh(name);
    }

    connected() {
      document.body.classList.remove("offline");
      this.setStatus("connecting", "connected");
      this.connection.send({type: "subscribe", id: this.nextRequestId++, ...SUBSCRIPTION});
      if (this.everConnected) this.loadSchema(); // the daemon may have restarted with other LoRAs
      this.everConnected = true;
    }

    disconnected(delay) {
      this.outbox.reset();
      this.version = 0; // a restarted daemon counts from 1 again
      document.body.classList.add("offline");
      this.setStatus("disconnected", `disconnected · retrying in ${(delay / 1000).toFixed(1)} s`);
      byId("fps").textContent = byId("latency").textContent = "–";
    }

    receive(message) {
      switch (message.type) {
        case "state":
          return this.applyState(message);
        case "ack": {
          const names = this.outbox.settle(message.id, message.state_version);
          if (Array.isArray(message.presets)) this.presets.show(message.presets); // a preset saved or recalled
          this.outbox.confirm(this.version); // the state push may have come before its ack
          for (const name of names) this.refresh(name);
          return;
        }
        case "error": {
          const names = this.outbox.settle(message.id);
          const {code, message: text} = message.error || {};
          this.showError(text ? `${text}${code ? ` (${code})` : ""}` : JSON.stringify(message), names);
          for (const name of names) this.refresh(name); // the daemon kept its value: show it again
          return;
        }
        case "telemetry":
          if (typeof message.error === "string" && message.error) this.showError(message.error, []);
          return this.showTelemetry(message);
        case "subscribed":
          return;
        default:
          console.debug("sdbridge: unhandled message", message);
      }
    }

    applyState({state_version: version, params}) {
      if (version < this.version) return; // an older state overtaken by a newer one
      this.state = params;
      this.version = version;
      byId("state-version").textContent = `v${version}`;
      this.outbox.confirm(version);
      // A parameter the page has no control for (a LoRA added to the models folders): fetch the schema
      // again, once per such set of names, not with every push.
      const unknown = Object.keys(params).filter((name) => !this.controls.has(name)).sort().join();
      if (unknown && unknown !== this.unknownNames) this.loadSchema();
      this.unknownNames = unknown;
      for (const name of this.controls.keys()) this.refresh(name);
    }

    /** Show the daemon's value of `name` unless the user holds that control or awaits their own change. */
    refresh(name) {
      const control = this.controls.get(name);
      if (!control || !(name in this.state) || control.isBusy() || this.outbox.unconfirmed(name)) return;
      control.show(this.state[name]);
    }

    setStatus(kind, text) {
      const status = byId("status");
      status.dataset.status = kind;
      status.textContent = text;
    }

    showTelemetry(t) {
      if (t.status) {
        const detail = t.status === "loading" && t.loading ? `loading ${t.loading}` : t.status;
        this.setStatus(t.status, detail);
        byId("status").title = [t.model, t.backend].filter(Boolean).join(" · ");
      }
      if (typeof t.fps === "number") byId("fps").textContent = t.fps.toFixed(1);
      if (typeof t.latency_ms === "number") byId("latency").textContent = `${Math.round(t.latency_ms)} ms`;
      if (typeof t.recording === "string") this.presets.showRecording(t.recording);
    }

    /** An error at the top of #errors (newest first), and on the controls it concerns: a red flash and
     * the message under the control, where a phone user scrolled down to it will see it. */
    showError(text, names) {
      const errors = byId("errors");
      const time = new Date().toLocaleTimeString([], {hour12: false});
      errors.prepend(h("p", {class: "error"}, h("time", {text: time}), " ", text));
      while (errors.childElementCount > ERRORS_KEPT) errors.lastElementChild.remove();
      for (const name of names) {
        const field = this.controls.get(name)?.field;
        if (!field) continue;
        field.classList.remove("flash");
        void field.offsetWidth; // restart the animation when the same control fails twice in a row
        field.classList.add("flash");
        field.dataset.error = text;
      }
    }
  }

  const page = new ControlPage();
  window.sdbridge = page;
  page.start();
})();
