"""Computer-use actions (OpenAI's computer tool: click, type, keypress, scroll, ...) done on a Playwright page."""

from __future__ import annotations

import base64
from collections.abc import Mapping
from typing import Any

# OpenAI's key names -> Playwright's
_KEYS = {"ENTER": "Enter", "RETURN": "Enter", "ESC": "Escape", "ESCAPE": "Escape", "TAB": "Tab",
         "BACKSPACE": "Backspace", "DELETE": "Delete", "SPACE": " ", "CTRL": "Control", "CMD": "Meta",
         "META": "Meta", "ALT": "Alt", "SHIFT": "Shift", "UP": "ArrowUp", "DOWN": "ArrowDown",
         "LEFT": "ArrowLeft", "RIGHT": "ArrowRight", "HOME": "Home", "END": "End",
         "PAGEUP": "PageUp", "PAGEDOWN": "PageDown"}  # fmt: skip


def _get(action: Any, name: str, default: Any = None) -> Any:
    if isinstance(action, Mapping):
        return action.get(name, default)
    return getattr(action, name, default)


def perform(page: Any, action: Any) -> None:
    """Do one computer-use action (a mapping or the SDK's action object) on a Playwright page.

    Coordinates are page pixels: a BrowserSession's screenshot(full_page=False) has the same."""
    kind = _get(action, "type")
    x, y = _get(action, "x"), _get(action, "y")
    if kind in ("click", "double_click"):
        button = {"wheel": "middle", "back": "left", "forward": "left"}.get(_get(action, "button", "left"), _get(action, "button", "left"))
        page.mouse.click(x, y, button=button, click_count=2 if kind == "double_click" else 1)
    elif kind == "move":
        page.mouse.move(x, y)
    elif kind == "drag":
        path = list(_get(action, "path", []))
        if path:
            page.mouse.move(_get(path[0], "x"), _get(path[0], "y"))
            page.mouse.down()
            for p in path[1:]:
                page.mouse.move(_get(p, "x"), _get(p, "y"))
            page.mouse.up()
    elif kind == "type":
        page.keyboard.type(_get(action, "text", ""))
    elif kind == "keypress":
        keys = [_KEYS.get(str(k).upper(), str(k)) for k in _get(action, "keys", [])]
        page.keyboard.press("+".join(keys))
    elif kind == "scroll":
        if x is not None and y is not None:
            page.mouse.move(x, y)
        page.mouse.wheel(_get(action, "scroll_x", 0) or 0, _get(action, "scroll_y", 0) or 0)
    elif kind == "wait":
        page.wait_for_timeout(int(_get(action, "ms", 1000) or 1000))
    elif kind == "screenshot":
        pass  # every turn sends a screenshot anyway
    else:
        raise ValueError(f"unknown computer-use action type {kind!r}")


def screenshot_input(png: bytes) -> dict[str, str]:
    """The screenshot as the computer_call_output the Responses API wants back."""
    return {"type": "computer_screenshot", "image_url": "data:image/png;base64," + base64.b64encode(png).decode()}
