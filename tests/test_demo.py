"""`sdbridge demo`, the README's main job, exactly as a user runs it."""
from __future__ import annotations

import re
import shutil
import subprocess

from PIL import Image

from .conftest import ROOT, SDBRIDGE


def test_the_sdbridge_command_is_installed():
    result = subprocess.run([shutil.which("sdbridge") or "sdbridge", "--version"], capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 0 and result.stdout.startswith("sdbridge ")


def test_demo_streams_frames_writes_a_contact_sheet_and_prints_a_summary(tmp_path):
    result = subprocess.run([*SDBRIDGE, "demo", "--seconds", "4", "--width", "128", "--height", "128",
                             "--out", str(tmp_path)], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert result.returncode == 0, result.stderr
    line = result.stdout.strip().splitlines()[-1]
    match = re.match(r"demo: (\d+) frames in [\d.]+ s, ([\d.]+) fps, latency p50 (\d+) ms, p95 (\d+) ms", line)
    assert match, line
    frames, fps, p50, p95 = int(match[1]), float(match[2]), int(match[3]), int(match[4])
    assert frames > 3 and fps > 0 and 0 < p50 <= p95
    sheet = Image.open(tmp_path / "sdbridge-demo.png")
    assert sheet.width == 6 * 160 and sheet.height >= 2 * 160
    assert "test model" in result.stderr  # the tiny model says its images mean nothing
