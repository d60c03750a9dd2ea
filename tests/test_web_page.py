"""The web control page (bridge/static) as a performer uses it: a real headless Chromium on the page a
real daemon serves. The page builds its controls from /api/schema, its controls change the daemon's
state (checked through GET /api/state, not through the page), and it shows the daemon's frames,
telemetry and errors."""
from __future__ import annotations

import json
import os
import shutil
import threading
import time
import urllib.request

import pytest

from .conftest import DaemonProcess, gradient, remove_segment

# Skipped on a machine without the browser stack, never in CI, where .ci/run installs both.
_REQUIRED = os.environ.get("CI") == "true"
try:
    from playwright import sync_api
except ImportError:
    if _REQUIRED:
        raise
    pytest.skip("the web page tests drive Chromium with playwright (pip install -e '.[browser]')", allow_module_level=True)
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
if not os.access(CHROMIUM, os.X_OK):
    if _REQUIRED:
        raise RuntimeError(f"no chromium at {CHROMIUM}: .ci/run installs Debian's chromium for the web page tests")
    pytest.skip("no chromium binary (apt install chromium): the web page tests need a real browser",
                allow_module_level=True)

WIDTH = HEIGHT = 128  # the daemon's output size
INPUT_FPS = 12  # input frames the module's daemon renders, so that fps and frames are live
TIMEOUT_S = 10.0


# ---------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def web_daemon():
    """One daemon for the module, rendering a still input frame INPUT_FPS times a second: the output
    changes only when a parameter does."""
    d = DaemonProcess(width=WIDTH, height=HEIGHT).wait_started()
    frame, running = gradient(WIDTH, HEIGHT), threading.Event()
    running.set()

    def feed() -> None:
        while running.is_set():
            d.write(frame)
            time.sleep(1 / INPUT_FPS)

    feeder = threading.Thread(target=feed, daemon=True)
    feeder.start()
    yield d
    running.clear()
    feeder.join(2)
    d.stop()
    for name in (d.name_in, d.name_out):
        remove_segment(name)


@pytest.fixture(scope="module")
def browser():
    with sync_api.sync_playwright() as p:
        chromium = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        yield chromium
        chromium.close()


def open_page(browser, d: DaemonProcess, **context_options):
    """A fresh page on the daemon's control page, once it holds the daemon's state. The page's script
    errors are collected in `page.script_errors`."""
    context = browser.new_context(**{"viewport": {"width": 1280, "height": 900}, **context_options})
    page = context.new_page()
    page.script_errors = []
    page.on("pageerror", lambda error: page.script_errors.append(str(error)))
    page.goto(d.url + "/")
    page.wait_for_function("document.getElementById('state-version').textContent.startsWith('v')",
                           timeout=TIMEOUT_S * 1000)
    return page


@pytest.fixture
def page(browser, web_daemon):
    page = open_page(browser, web_daemon)
    yield page
    page.context.close()


# ---------------------------------------------------------------------------- helpers
def get_json(d: DaemonProcess, path: str) -> dict:
    with urllib.request.urlopen(d.url + path, timeout=5) as response:
        return json.load(response)


def wait_for_state(d: DaemonProcess, predicate, timeout: float = TIMEOUT_S) -> dict:
    """GET /api/state until `predicate(params)` holds; the whole state then."""
    end = time.monotonic() + timeout
    while True:
        state = get_json(d, "/api/state")
        if predicate(state["params"]):
            return state
        if time.monotonic() > end:
            raise AssertionError(f"the daemon's state never matched; last: {state}")
        time.sleep(0.05)


def control(page, name: str):
    return page.locator(f'[data-param="{name}"]')


def preview_fingerprint(page) -> dict:
    """The preview's src, natural width and a checksum of its pixels."""
    return page.evaluate("""() => {
        const img = document.getElementById('preview');
        const canvas = document.createElement('canvas');
        canvas.width = img.naturalWidth; canvas.height = img.naturalHeight;
        let sum = 0;
        if (img.naturalWidth) {
            const g = canvas.getContext('2d');
            g.drawImage(img, 0, 0);
            for (const v of g.getImageData(0, 0, canvas.width, canvas.height).data) sum = (sum * 31 + v) % 1000000007;
        }
        return {src: img.src, width: img.naturalWidth, pixels: sum};
    }""")


def drag(page, slider, fractions, pause_s: float = 0.0) -> None:
    """Drag a slider with the mouse through `fractions` of its width, as fast as the mouse goes or
    pausing `pause_s` at each."""
    slider.scroll_into_view_if_needed()
    box = slider.bounding_box()
    y = box["y"] + box["height"] / 2
    page.mouse.move(box["x"] + 2, y)
    page.mouse.down()
    for fraction in fractions:
        page.mouse.move(box["x"] + box["width"] * fraction, y)
        if pause_s:
            time.sleep(pause_s)
    page.mouse.up()


# ---------------------------------------------------------------------------- tests
def test_page_builds_one_control_for_every_schema_parameter(page, web_daemon):
    schema = [p["name"] for p in get_json(web_daemon, "/api/schema")["params"]]
    shown = page.eval_on_selector_all("[data-param]", "nodes => nodes.map(n => n.dataset.param)")
    assert sorted(shown) == sorted(schema)
    assert page.script_errors == []


def test_dragging_the_strength_slider_sets_strength(page, web_daemon):
    version = get_json(web_daemon, "/api/state")["state_version"]
    slider = control(page, "strength")
    drag(page, slider, [0.1 + 0.07 * i for i in range(1, 11)], pause_s=0.01)  # input events all the way, sent throttled
    shown = float(slider.input_value())
    assert 0.7 < shown < 0.9
    state = wait_for_state(web_daemon, lambda p: p["strength"] == pytest.approx(shown))
    assert state["state_version"] >= version + 2  # sent while moving, not only on release


def test_a_slider_drag_sends_at_most_one_set_per_40_ms_ending_with_its_final_value(browser, web_daemon):
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    # Record what the page sends (the real socket still sends it).
    context.add_init_script("""{
        const send = WebSocket.prototype.send;
        window.sentSets = [];
        WebSocket.prototype.send = function (data) {
            if (typeof data === 'string' && JSON.parse(data).type === 'set')
                window.sentSets.push({t: performance.now(), params: JSON.parse(data).params});
            return send.call(this, data);
        };
    }""")
    page = context.new_page()
    try:
        page.goto(web_daemon.url + "/")
        slider = control(page, "strength")
        drag(page, slider, [0.05 + 0.02 * i for i in range(40)])  # far more input events than 25 a second
        final = float(slider.input_value())
        wait_for_state(web_daemon, lambda p: p["strength"] == pytest.approx(final))
        sets = page.evaluate("window.sentSets")
        gaps = [b["t"] - a["t"] for a, b in zip(sets, sets[1:])]
        assert len(sets) >= 2 and min(gaps) >= 39
        assert sets[-1]["params"] == {"strength": pytest.approx(final)}
    finally:
        context.close()


def test_typing_a_prompt_sets_prompt(page, web_daemon):
    control(page, "prompt").fill("a red fox in the snow")  # no Enter: sent once typing pauses
    wait_for_state(web_daemon, lambda p: p["prompt"] == "a red fox in the snow")


def test_the_randomise_button_changes_the_seed(page, web_daemon):
    before = get_json(web_daemon, "/api/state")["params"]["seed"]
    page.locator('[data-randomise="seed"]').click()
    seed = wait_for_state(web_daemon, lambda p: p["seed"] != before)["params"]["seed"]
    assert 0 <= seed <= 2**31 - 1
    assert control(page, "seed").input_value() == str(seed)


def test_a_list_parameter_is_set_from_its_json_box(page, web_daemon):
    page.locator("details[data-section='advanced'] summary").click()
    blend = [["a cat", 1.0], ["a dog", 0.5]]
    box = control(page, "prompts")
    box.fill(json.dumps(blend))
    box.press("Enter")
    wait_for_state(web_daemon, lambda p: p["prompts"] == blend)


def test_a_state_change_made_elsewhere_shows_on_the_page(page, web_daemon):
    guidance = 3.0 if get_json(web_daemon, "/api/state")["params"]["guidance_scale"] != 3.0 else 4.0
    web_daemon.send("/guidance_scale", guidance)  # over OSC, as TouchDesigner would
    page.wait_for_function(f"Number(document.querySelector('[data-param=guidance_scale]').value) === {guidance}",
                           timeout=TIMEOUT_S * 1000)


def test_a_state_push_leaves_the_focused_control_alone_until_it_is_left(page, web_daemon):
    box = control(page, "negative_prompt")
    typed_before = box.input_value()
    box.focus()
    web_daemon.send("/negative_prompt", f"pushed {time.monotonic()}")
    state = wait_for_state(web_daemon, lambda p: p["negative_prompt"] != typed_before)
    page.wait_for_function(f"document.getElementById('state-version').textContent === 'v{state['state_version']}'",
                           timeout=TIMEOUT_S * 1000)
    assert box.input_value() == typed_before  # the push arrived; the box the user is in did not move
    box.blur()
    assert box.input_value() == state["params"]["negative_prompt"]


def test_an_out_of_range_value_shows_the_daemons_error_and_changes_nothing(page, web_daemon):
    before = get_json(web_daemon, "/api/state")
    value_box = page.locator('[data-value-for="strength"]')
    value_box.fill("1.5")
    value_box.press("Enter")
    page.wait_for_function("document.getElementById('errors').textContent.includes('strength')",
                           timeout=TIMEOUT_S * 1000)
    assert "1.5" in page.locator("#errors").inner_text()
    after = get_json(web_daemon, "/api/state")
    assert after["params"]["strength"] == before["params"]["strength"]
    assert after["state_version"] == before["state_version"]


def test_a_list_box_with_bad_json_shows_an_error_and_sends_nothing(page, web_daemon):
    before = get_json(web_daemon, "/api/state")["state_version"]
    page.locator("details[data-section='advanced'] summary").click()
    box = control(page, "t_index_list")
    box.fill("[10, 30")
    box.press("Enter")
    page.wait_for_function("document.getElementById('errors').textContent.includes('t_index_list')",
                           timeout=TIMEOUT_S * 1000)
    time.sleep(0.2)  # what the page would have sent has had time to arrive
    assert get_json(web_daemon, "/api/state")["state_version"] == before


def test_the_preview_shows_frames_and_follows_a_parameter_change(page, web_daemon):
    page.wait_for_function(f"document.getElementById('preview').naturalWidth === {WIDTH}", timeout=TIMEOUT_S * 1000)
    before = preview_fingerprint(page)
    strength = get_json(web_daemon, "/api/state")["params"]["strength"]
    slider = control(page, "strength")
    slider.fill("0.2" if strength > 0.5 else "0.9")  # sets the value and fires input and change
    end = time.monotonic() + TIMEOUT_S
    # until a new frame has loaded (while one loads, the img has no size and no pixels to compare)
    while (now := preview_fingerprint(page))["pixels"] == before["pixels"] or now["width"] != WIDTH:
        assert time.monotonic() < end, "the preview never showed the new strength's frames"
        time.sleep(0.05)
    assert now["src"] != before["src"] and now["width"] == WIDTH


def test_fps_and_latency_are_shown(page):
    page.wait_for_function("Number(document.getElementById('fps').textContent) > 0", timeout=TIMEOUT_S * 1000)
    assert page.locator("#latency").inner_text().endswith("ms")
    assert page.locator("#status").inner_text() == "ready"


def test_the_page_fits_a_phone_screen(browser, web_daemon):
    page = open_page(browser, web_daemon, viewport={"width": 390, "height": 844}, is_mobile=True, has_touch=True)
    try:
        assert page.evaluate("document.documentElement.scrollWidth") <= 390
        # every visible control lies within the screen, and the preview sits above the controls
        rights = page.eval_on_selector_all(
            "[data-param], [data-randomise]",
            "nodes => nodes.filter(n => n.offsetParent).map(n => n.getBoundingClientRect().right)")
        assert rights and max(rights) <= 390
        preview, controls = page.locator("#preview").bounding_box(), page.locator("#controls").bounding_box()
        assert controls["y"] >= preview["y"] + preview["height"]
        assert page.locator('[data-randomise="seed"]').bounding_box()["height"] >= 40  # a fingertip
    finally:
        page.context.close()


def test_presets_are_saved_and_recalled_from_the_page(page, web_daemon):
    page.fill("#preset-name", "page look")
    page.click("#preset-save")
    page.wait_for_selector('[data-preset="page look"]', timeout=TIMEOUT_S * 1000)
    saved = get_json(web_daemon, "/api/state")["params"]["strength"]
    other = 0.25 if saved != 0.25 else 0.75
    control(page, "strength").fill(str(other))
    control(page, "strength").dispatch_event("change")
    wait_for_state(web_daemon, lambda p: p["strength"] == pytest.approx(other))
    page.click('[data-preset="page look"]')
    wait_for_state(web_daemon, lambda p: p["strength"] == pytest.approx(saved))
    # the slider shows it, to its step (a value saved from a drag may have more digits than the step)
    page.wait_for_function(f"Math.abs(Number(document.querySelector('[data-param=strength]').value) - {saved}) < 0.002",
                           timeout=TIMEOUT_S * 1000)


def test_a_recall_comes_after_slider_moves_still_held_back_by_the_throttle(page, web_daemon):
    page.fill("#preset-name", "throttled look")
    page.click("#preset-save")
    page.wait_for_selector('[data-preset="throttled look"]', timeout=TIMEOUT_S * 1000)
    saved = get_json(web_daemon, "/api/state")["params"]["strength"]
    first, second = (0.25, 0.35) if saved > 0.5 else (0.65, 0.75)
    # In one turn of the page's event loop: the first move goes out at once, the second waits for the
    # 40 ms throttle, and the recall is clicked meanwhile. The daemon must end on the preset.
    page.evaluate("""([first, second]) => {
        const slider = document.querySelector('[data-param=strength]');
        for (const value of [first, second]) {
            slider.value = String(value);
            slider.dispatchEvent(new Event('input', {bubbles: true}));
        }
        document.querySelector('[data-preset="throttled look"]').click();
    }""", [first, second])
    time.sleep(0.5)  # anything the page still held back has had time to arrive
    assert get_json(web_daemon, "/api/state")["params"]["strength"] == pytest.approx(saved)
    page.wait_for_function(f"Math.abs(Number(document.querySelector('[data-param=strength]').value) - {saved}) < 0.002",
                           timeout=TIMEOUT_S * 1000)


def test_a_preset_button_morphs_over_the_seconds_set_and_record_toggles_a_recording(page, web_daemon):
    page.fill("#preset-name", "morph target")
    page.click("#preset-save")
    page.wait_for_selector('[data-preset="morph target"]', timeout=TIMEOUT_S * 1000)
    saved = get_json(web_daemon, "/api/state")["params"]["strength"]
    other = 0.1 if saved > 0.5 else 0.9
    control(page, "strength").fill(str(other))
    control(page, "strength").dispatch_event("change")
    wait_for_state(web_daemon, lambda p: p["strength"] == pytest.approx(other))
    page.fill("#morph-seconds", "1.5")
    page.click('[data-preset="morph target"]')
    # eased, not jumped: a value between the two on the way
    wait_for_state(web_daemon, lambda p: min(saved, other) + 0.01 < p["strength"] < max(saved, other) - 0.01)
    wait_for_state(web_daemon, lambda p: p["strength"] == pytest.approx(saved))
    page.click("#record")
    page.wait_for_selector("#record.recording", timeout=TIMEOUT_S * 1000)  # telemetry says it records
    page.click("#record")
    page.wait_for_selector("#record:not(.recording)", timeout=TIMEOUT_S * 1000)
