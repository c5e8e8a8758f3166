"""A real headless Chromium for the console tests (Debian's `chromium`, driven by Playwright),
the checks every page must pass (labels, contrast, charts described, no sideways scrolling),
and where screenshots go: ``artifacts/console/`` (or ``$EDGEFLEET_ARTIFACTS/console/``), kept
by CI as artifacts."""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

import pytest
from playwright.sync_api import Browser, Page, Playwright

REPO = Path(__file__).resolve().parents[2]
ARTIFACTS = Path(os.environ.get("EDGEFLEET_ARTIFACTS", REPO / "artifacts")) / "console"
DESKTOP = {"width": 1280, "height": 800}
TABLET = {"width": 768, "height": 1024}

# Chromium as root in a container, with nothing reaching out to the network on its own.
FLAGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-dev-shm-usage",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


def chromium_path() -> str:
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if found is None:
        pytest.fail("the console tests need Chromium: `apt-get install chromium` (.ci/run does)")
    return found


def launch(playwright: Playwright) -> Browser:
    return playwright.chromium.launch(executable_path=chromium_path(), args=FLAGS)


def screenshot(page: Page, name: str) -> Path:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    path = ARTIFACTS / f"{name}.png"
    page.screenshot(path=path, full_page=True)
    return path


# Every visible text against its background (WCAG 2 contrast: 4.5:1, 3:1 for large text).
_CONTRAST = """() => {
  const parse = (c) => {
    const m = c && c.match(/rgba?\\(([^)]+)\\)/);
    if (!m) return null;
    const [r, g, b, a = 1] = m[1].split(/[\\s,\\/]+/).filter(Boolean).map(Number);
    return { r, g, b, a };
  };
  const lum = ({ r, g, b }) => {
    const f = (v) => { v /= 255; return v <= 0.03928 ? v / 12.92 : ((v + 0.055) / 1.055) ** 2.4; };
    return 0.2126 * f(r) + 0.7152 * f(g) + 0.0722 * f(b);
  };
  const background = (el) => {
    for (let e = el; e; e = e.parentElement) {
      const c = parse(getComputedStyle(e).backgroundColor);
      if (c && c.a > 0.5) return c;
    }
    return { r: 255, g: 255, b: 255, a: 1 };
  };
  const low = [];
  const seen = new Set();
  const walker = document.createTreeWalker(document.body, NodeFilter.SHOW_TEXT);
  while (walker.nextNode()) {
    const text = walker.currentNode.textContent.trim();
    const el = walker.currentNode.parentElement;
    if (!text || seen.has(el) || el.closest("noscript, title, desc, option")) continue;
    seen.add(el);
    const style = getComputedStyle(el);
    const box = el.getBoundingClientRect();
    if (style.visibility === "hidden" || box.width === 0 || box.height === 0) continue;
    const fg = parse(el.closest("svg") ? style.fill : style.color);
    if (!fg) continue;
    const [hi, lo] = [lum(fg), lum(background(el))].sort((x, y) => y - x);
    const ratio = (hi + 0.05) / (lo + 0.05);
    const size = parseFloat(style.fontSize);
    const large = size >= 24 || (Number(style.fontWeight) >= 700 && size >= 18.66);
    if (ratio < (large ? 3 : 4.5)) {
      low.push(`${el.tagName} "${text.slice(0, 40)}": ${ratio.toFixed(2)}`);
    }
  }
  return low;
}"""

# Form controls without an accessible name, buttons without a name, charts without a title.
_UNLABELLED = """() => {
  const shown = (e) => e.getClientRects().length > 0;
  const named = (e) => e.getAttribute("aria-label") || e.getAttribute("aria-labelledby");
  const controls = [...document.querySelectorAll("input, select, textarea")]
    .filter((e) => shown(e) && e.type !== "hidden" && !(e.labels && e.labels.length) && !named(e));
  const buttons = [...document.querySelectorAll("button, a")]
    .filter((e) => shown(e) && !e.textContent.trim() && !named(e));
  const charts = [...document.querySelectorAll("svg")]
    .filter((e) => e.getAttribute("aria-hidden") !== "true"
      && !(e.getAttribute("role") === "img" && e.querySelector("title") && named(e)));
  return [...controls, ...buttons, ...charts].map((e) => e.outerHTML.slice(0, 100));
}"""

_OVERFLOW = "() => document.documentElement.scrollWidth - document.documentElement.clientWidth"


def accessibility_problems(page: Page) -> dict[str, Any]:
    """What is wrong on the page as shown; an empty dict when nothing is."""
    problems = {
        "low contrast": page.evaluate(_CONTRAST),
        "no accessible name": page.evaluate(_UNLABELLED),
        "scrolls sideways by px": page.evaluate(_OVERFLOW),
    }
    return {k: v for k, v in problems.items() if v}
