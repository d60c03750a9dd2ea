"""Fuzzing the daemon's inputs (issue 9): the seed corpus, the mutators, and how long a run lasts.

corpus/<target>/ holds the seeds, one small file each, written by make_corpus.py (osc: datagrams,
ws_text: WebSocket text messages, ws_binary: WebSocket frame messages, ring: whole shared-memory
segments). mutate.py turns them, and the protocol and parameter schema, into hostile inputs.
tests/test_fuzz.py drives the daemon's real handlers with them.

Run length: the hypothesis profile `sdbridge-fuzz-ci` (a fixed number of examples per target, sized for
CI, new random examples every run) unless the environment sets SDBRIDGE_FUZZ_SECONDS, which runs each
target again and again under the profile `sdbridge-fuzz` for that many seconds (a manual campaign).
Hypothesis keeps the failing examples it finds in .hypothesis/ (git-ignored) and replays them first;
the committed corpus is what is kept for good.
"""
from __future__ import annotations

import os
import time
from collections import Counter
from pathlib import Path
from typing import Callable

from hypothesis import HealthCheck, settings

CORPUS = Path(__file__).resolve().with_name("corpus")
TARGETS = ("osc", "ws_text", "ws_binary", "ring")
FUZZ_SECONDS = float(os.environ.get("SDBRIDGE_FUZZ_SECONDS") or 0)

settings.register_profile(
    "sdbridge-fuzz-ci", deadline=None, derandomize=False, print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much,
                           HealthCheck.large_base_example])
# One round of a campaign; rounds repeat until SDBRIDGE_FUZZ_SECONDS pass.
settings.register_profile("sdbridge-fuzz", settings.get_profile("sdbridge-fuzz-ci"), max_examples=2000)

EXAMPLES: Counter[str] = Counter()  # examples run per target in this process


def corpus_files(target: str) -> list[Path]:
    """The seed files of a target, by name."""
    return sorted((CORPUS / target).glob("*.bin"))


def corpus(target: str) -> list[bytes]:
    """The seeds of a target, as bytes."""
    return [path.read_bytes() for path in corpus_files(target)]


def fuzz_settings(ci_examples: int) -> settings:
    """The settings of one fuzz test: `ci_examples` examples in CI, a campaign's round otherwise."""
    if FUZZ_SECONDS:
        return settings(settings.get_profile("sdbridge-fuzz"))
    return settings(settings.get_profile("sdbridge-fuzz-ci"), max_examples=ci_examples)


def campaign(target: str, run: Callable[[], None]) -> None:
    """Run a hypothesis test once, or, with SDBRIDGE_FUZZ_SECONDS, round after round (each with new
    random examples) until that time has passed; prints how many examples ran."""
    start = time.monotonic()
    run()
    while time.monotonic() - start < FUZZ_SECONDS:
        run()
    print(f"\nfuzz {target}: {EXAMPLES[target]} examples in {time.monotonic() - start:.1f} s")
