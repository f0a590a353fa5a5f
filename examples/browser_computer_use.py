"""Computer use with OpenAI's Responses API driving a BrowserSession (the reference docs' loop, complete).

    OPENAI_API_KEY=... python3 examples/browser_computer_use.py

The model sees screenshots of the session's page and answers with computer_call items
(click, type, keypress, scroll, ...); smolvm.browser_actions.perform() does each one with
Playwright, and the next screenshot goes back as the call's output. tests/test_browser.py
runs this loop offline with a scripted client in place of OpenAI's.
"""

from __future__ import annotations

from typing import Any

from smolvm import BrowserSession, BrowserSessionConfig
from smolvm.browser_actions import perform, screenshot_input


def computer_use_loop(session: BrowserSession, client: Any, task: str, *, model: str = "computer-use-preview",
                      max_turns: int = 20) -> str:  # fmt: skip
    """Run the model's actions on session's page until it stops asking; return its last text."""
    page = session.page()
    cfg = session.config
    tools = [{"type": "computer_use_preview", "display_width": cfg.viewport_width,
              "display_height": cfg.viewport_height, "environment": "browser"}]  # fmt: skip
    response = client.responses.create(model=model, tools=tools, input=task, truncation="auto")
    for _ in range(max_turns):
        calls = [item for item in response.output if item.type == "computer_call"]
        if not calls:
            break
        outputs = []
        for call in calls:
            perform(page, call.action)
            outputs.append({"type": "computer_call_output", "call_id": call.call_id,
                            "output": screenshot_input(session.screenshot(full_page=False))})  # fmt: skip
        response = client.responses.create(model=model, tools=tools, previous_response_id=response.id,
                                           input=outputs, truncation="auto")  # fmt: skip
    return "".join(
        part.text for item in response.output if item.type == "message" for part in item.content
        if getattr(part, "text", None)
    )


if __name__ == "__main__":
    from openai import OpenAI

    with BrowserSession(BrowserSessionConfig(mode="live", viewport={"width": 1440, "height": 900})) as session:
        print("watch it at", session.live_url)
        session.page().set_content("<h1>Main heading</h1><p>Some text.</p>")
        print(computer_use_loop(session, OpenAI(), "Find the main heading on the page."))
