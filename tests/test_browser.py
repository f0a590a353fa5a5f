"""BrowserSession: config checks, then real Chromium in a real VM driven by real Playwright on the host."""

from __future__ import annotations

import json
import os
import shutil
import struct
import subprocess
import sys
import zlib
from collections.abc import Iterator
from pathlib import Path

import pytest

from smolvm import BrowserSession, BrowserSessionConfig, SmolVM, SmolVMError
from smolvm.browser_config import BrowserConfigError, parse_viewport

MEM = 1024  # MiB: enough for Chromium with a small page; a smaller guest boots faster where ring 0 is emulated
PAGE = """<!doctype html>
<html><head><title>smolvm test page</title>
<style>body { background: #2050c0; color: white; font: 40px sans-serif; margin: 0 }</style></head>
<body><h1 id="h">Hello from the guest</h1><p id="sum"></p>
<input id="box"><button id="btn" onclick="document.getElementById('out').textContent =
  'clicked:' + document.getElementById('box').value">Go</button><p id="out"></p>
<script>document.getElementById('sum').textContent = 'sum=' + [1, 2, 3, 4].reduce((a, b) => a + b);
localStorage.setItem('who', 'session-one-' + Math.random());</script>
</body></html>
"""


# ---- configuration (no VM) --------------------------------------------------------------


def test_config_defaults_and_viewport_forms() -> None:
    c = BrowserSessionConfig()
    assert (c.mode, c.profile_mode, c.browser) == ("headless", "ephemeral", "chromium")
    assert (c.viewport_width, c.viewport_height, c.mem_size_mib, c.disk_size_mib) == (1280, 720, 2048, 4096)
    v = BrowserSessionConfig(mode="live", record_video=True, viewport={"width": 1440, "height": 900})
    assert (v.viewport_width, v.viewport_height) == (1440, 900)
    assert v.viewport == {"width": 1440, "height": 900}
    w = BrowserSessionConfig(viewport_width=800, viewport_height=600)
    assert w.viewport == {"width": 800, "height": 600}
    assert BrowserSessionConfig.from_dict(v.to_dict()) == v
    assert v.replace(session_id="abc").session_id == "abc"
    assert parse_viewport("1440x900") == {"width": 1440, "height": 900}


@pytest.mark.parametrize(
    "kwargs, words",
    [
        ({"record_video": True}, "mode='live'"),
        ({"viewport": {"width": 320, "height": 900}}, "between 640 and 7680"),
        ({"viewport_height": 5000}, "between 480 and 4320"),
        ({"viewport": {"width": 1000}, "viewport_width": 900}, "contradicts"),
        ({"viewport": [1, 2]}, "mapping"),
        ({"profile_mode": "persistent"}, "profile_id"),
        ({"profile_id": "work"}, "profile_mode='persistent'"),
        ({"mode": "desktop"}, "'headless', 'live'"),
        ({"browser": "firefox"}, "'chromium'"),
        ({"timeout_minutes": 0}, "between 1 and 240"),
        ({"timeout_minutes": 241}, "between 1 and 240"),
        ({"mem_size_mib": 256}, "between 512"),
        ({"disk_size_mib": True}, "must be an int"),
        ({"session_id": "bad id!"}, "letters, digits"),
        ({"env_vars": {"A=B": "x"}}, "env_vars"),
        ({"allow_downloads": "yes"}, "True or False"),
    ],
)
def test_config_rejects_bad_input(kwargs: dict, words: str) -> None:
    with pytest.raises(BrowserConfigError, match=None) as e:
        BrowserSessionConfig(**kwargs)
    assert words in str(e.value)
    assert isinstance(e.value, (SmolVMError, ValueError))
    with pytest.raises(BrowserConfigError):
        parse_viewport("big")


def test_playwright_missing_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "playwright", None)
    monkeypatch.setitem(sys.modules, "playwright.sync_api", None)
    with pytest.raises(ImportError, match=r"smolvm\[browser\]"):
        BrowserSession().connect_playwright()


def test_unknown_session_and_empty_list(smolvm_env: dict[str, str]) -> None:
    with pytest.raises(SmolVMError, match="no browser session 'browser-nope'"):
        BrowserSession.from_id("browser-nope")
    out = subprocess.run([sys.executable, "-m", "smolvm", "browser", "stop", "browser-nope"],
                         capture_output=True, text=True, env=smolvm_env)  # fmt: skip
    assert out.returncode == 1 and "no browser session" in out.stderr


# ---- a real browser in a real VM ------------------------------------------------------------


def png_size(data: bytes) -> tuple[int, int]:
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
    return struct.unpack(">II", data[16:24])


def png_rows(data: bytes) -> list[bytes]:
    """The unfiltered-enough scanlines of an 8-bit RGB(A) PNG: enough to tell a blank image."""
    width, height = png_size(data)
    pos, idat = 8, b""
    while pos < len(data):
        (length,) = struct.unpack(">I", data[pos : pos + 4])
        kind = data[pos + 4 : pos + 8]
        if kind == b"IDAT":
            idat += data[pos + 8 : pos + 8 + length]
        pos += 12 + length
    raw = zlib.decompress(idat)
    stride = len(raw) // height
    return [raw[i * stride + 1 : (i + 1) * stride] for i in range(height)]


def distinct_rows(data: bytes) -> int:
    return len(set(png_rows(data)))


def require_browser_host() -> None:
    """Where guest ring 0 is emulated (compat profile) a cold Chromium start in the guest did not
    answer within 8 minutes on a loaded 2-core host (measured 2026-12-01, before the AVX fix). In
    the nested profile Chromium starts (187-307 s cold on a loaded 2-core host) and its snapshot is
    saved, but a restored session answered CDP only after 45-77 s and Playwright's first commands
    timed out (the restored memory pages in over 9p; measured 2026-12-01). The browser tests run
    on those profiles only when asked for with SMOLVM_BROWSER_TESTS=1."""
    from smolvm.profile import detect

    profile = detect().name
    if profile != "native" and os.environ.get("SMOLVM_BROWSER_TESTS") != "1":
        pytest.skip(f"{profile} profile: Chromium in the guest is too slow here for the suite's time; "
                    "SMOLVM_BROWSER_TESTS=1 runs the browser tests anyway")


@pytest.fixture(scope="module")
def session() -> Iterator[BrowserSession]:
    """One headless session shared by this module's browser tests (each page load is guest-kernel time)."""
    require_browser_host()
    with BrowserSession(BrowserSessionConfig(viewport={"width": 1024, "height": 768}, mem_size_mib=MEM)) as s:
        yield s


@pytest.fixture(scope="module")
def page_url(session: BrowserSession, tmp_path_factory: pytest.TempPathFactory) -> str:
    local = tmp_path_factory.mktemp("page") / "index.html"
    local.write_text(PAGE)
    session.push_file(local, "/opt/pages/index.html")
    return "file:///opt/pages/index.html"


@pytest.mark.vm
@pytest.mark.guest_only
def test_reference_example_against_a_local_page(session: BrowserSession, page_url: str, tmp_path: Path) -> None:
    assert session.status == "ready" and session.vm_id and session.live_url is None
    assert session.cdp_url is not None and session.cdp_url.startswith("http://127.0.0.1:")
    assert isinstance(session.vm, SmolVM) and session.vm.run("echo ok").output == "ok"
    browser = session.connect_playwright()
    context = browser.contexts[0] if browser.contexts else browser.new_context()
    page = context.pages[0] if context.pages else context.new_page()
    page.goto(page_url, wait_until="networkidle")
    assert page.title() == "smolvm test page"
    assert page.text_content("#sum") == "sum=10"
    page.fill("#box", "typed")
    page.click("#btn")
    assert page.text_content("#out") == "clicked:typed"
    shot = session.screenshot(tmp_path / "shot.png")
    assert (tmp_path / "shot.png").read_bytes() == shot
    assert png_size(shot) == (1024, 768)
    assert distinct_rows(shot) > 10, "the screenshot is blank"
    assert any(s.session_id == session.session_id for s in BrowserSession.list())


@pytest.mark.vm
@pytest.mark.guest_only
def test_from_id_in_a_second_process(session: BrowserSession, page_url: str, smolvm_env: dict[str, str]) -> None:
    code = (
        "import sys, json\n"
        "from smolvm import BrowserSession\n"
        "s = BrowserSession.from_id(sys.argv[1])\n"
        "b = s.connect_playwright()\n"
        "p = b.contexts[0].pages[0]\n"
        "print(json.dumps([s.cdp_url, p.url, p.title()]))\n"
        "s.close()\n"
    )
    out = subprocess.run([sys.executable, "-c", code, session.session_id], capture_output=True,
                         text=True, env=smolvm_env, timeout=600)  # fmt: skip
    assert out.returncode == 0, out.stderr
    cdp, url, title = json.loads(out.stdout.strip().splitlines()[-1])
    assert cdp == session.cdp_url and url == page_url and title == "smolvm test page"
    assert session.vm.status == "running"  # the other process's close() left it running


def _port_open(port: int) -> bool:
    import socket

    with socket.socket() as s:
        s.settimeout(2)
        return s.connect_ex(("127.0.0.1", port)) == 0


@pytest.mark.vm
@pytest.mark.guest_only
def test_two_sessions_are_isolated_and_close_leaves_nothing(session: BrowserSession, page_url: str) -> None:
    page = session.page()
    page.goto(page_url)
    page.evaluate("document.cookie = 'who=one; path=/'; localStorage.setItem('mark', 'one')")
    with BrowserSession(BrowserSessionConfig(viewport={"width": 1024, "height": 768}, mem_size_mib=MEM)) as other:
        assert other.cdp_url != session.cdp_url and other.vm_id != session.vm_id
        other.push_file(Path(__file__).with_name("conftest.py"), "/opt/pages/x.txt")  # folder made on demand
        other.vm.run("mkdir -p /opt/pages && cp /opt/pages/x.txt /dev/null")
        p2 = other.page()
        p2.set_content("<title>two</title>")
        assert p2.evaluate("localStorage.getItem('mark')") is None
        assert p2.context.cookies() == []
        port, vm_id, sid, reaper = other.info.debug_port, other.vm_id, other.session_id, other.info.reaper_pid
        assert port is not None and _port_open(port)
    assert other.status == "stopped"
    assert vm_id not in {r.vm_id for r in SmolVM.list()}
    assert sid not in {s.session_id for s in BrowserSession.list()}
    assert not _port_open(port)
    assert reaper and not Path(f"/proc/{reaper}").exists()
    assert page.evaluate("localStorage.getItem('mark')") == "one"  # the first session is untouched


@pytest.mark.vm
@pytest.mark.guest_only
def test_live_view_and_recording() -> None:
    """mode='live': live_url shows the guest's display to a browser on the host; the recording
    is finalised on stop() and ffprobe reads it with the configured size."""
    import urllib.request

    from playwright.sync_api import sync_playwright

    require_browser_host()
    host_chromium, ffprobe = shutil.which("chromium"), shutil.which("ffprobe")
    assert host_chromium and ffprobe, "needs the host's chromium and ffprobe: apt-get install chromium ffmpeg"
    cfg = BrowserSessionConfig(mode="live", record_video=True, viewport={"width": 800, "height": 600}, mem_size_mib=MEM)
    with BrowserSession(cfg) as s:
        assert s.live_url is not None and s.live_url.startswith("http://127.0.0.1:")
        with urllib.request.build_opener(urllib.request.ProxyHandler({})).open(s.live_url, timeout=30) as r:
            assert b"noVNC" in r.read()
        page = s.page()
        page.set_content("<body style='background:#c02020;margin:0'><h1 style='font-size:90px'>LIVE</h1></body>")
        shot = s.screenshot()
        assert png_size(shot) == (800, 600) and distinct_rows(shot) > 10
        with sync_playwright() as pw:  # a headless Chromium on the host opens the noVNC page
            viewer = pw.chromium.launch(executable_path=host_chromium, args=["--no-sandbox"])
            vp = viewer.new_page(viewport={"width": 800, "height": 600})
            vp.goto(s.live_url)
            vp.wait_for_selector("canvas", timeout=120_000)
            vp.wait_for_timeout(5000)
            first = vp.screenshot()
            page.set_content("<body style='background:#20c040;margin:0'><h1>CHANGED</h1></body>")
            vp.wait_for_timeout(5000)
            second = vp.screenshot()
            viewer.close()
        assert distinct_rows(first) > 5, "the live view is blank"
        assert first != second, "the live view did not follow the guest's page"
        artifacts = s.artifacts_dir
    video = artifacts / "recording.mp4"
    assert video.is_file() and video.stat().st_size > 0
    out = subprocess.run([ffprobe, "-v", "error", "-select_streams", "v:0", "-show_entries",
                          "stream=width,height:format=duration", "-of", "json", str(video)],
                         capture_output=True, text=True, check=True)  # fmt: skip
    probe = json.loads(out.stdout)
    assert (probe["streams"][0]["width"], probe["streams"][0]["height"]) == (800, 600)
    assert float(probe["format"]["duration"]) > 0


@pytest.mark.vm
@pytest.mark.guest_only
def test_computer_use_loop_with_a_scripted_model(session: BrowserSession, page_url: str) -> None:
    """examples/browser_computer_use.py's loop, the OpenAI client replaced by a scripted one."""
    from types import SimpleNamespace

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "examples"))
    try:
        from browser_computer_use import computer_use_loop
    finally:
        sys.path.pop(0)
    page = session.page()
    page.goto(page_url)
    box, btn = page.locator("#box").bounding_box(), page.locator("#btn").bounding_box()
    assert box and btn

    def center(b: dict) -> dict:
        return {"x": int(b["x"] + b["width"] / 2), "y": int(b["y"] + b["height"] / 2)}

    turns = [
        [{"type": "click", "button": "left", **center(box)}, {"type": "type", "text": "agent"}],
        [{"type": "click", "button": "left", **center(btn)}],
        [],
    ]
    seen: list[dict] = []

    class Responses:
        def create(self, **kw: object) -> SimpleNamespace:
            seen.append(kw)
            actions = turns[len(seen) - 1]
            if not actions:
                msg = SimpleNamespace(type="message", content=[SimpleNamespace(text="done")])
                return SimpleNamespace(id=f"r{len(seen)}", output=[msg])
            calls = [SimpleNamespace(type="computer_call", call_id=f"c{len(seen)}{i}", action=a)
                     for i, a in enumerate(actions)]  # fmt: skip
            return SimpleNamespace(id=f"r{len(seen)}", output=calls)

    assert computer_use_loop(session, SimpleNamespace(responses=Responses()), "Type agent and press Go") == "done"
    assert page.text_content("#out") == "clicked:agent"
    assert seen[0]["tools"][0]["display_width"] == 1024
    outputs = seen[1]["input"]
    assert isinstance(outputs, list) and outputs[0]["output"]["image_url"].startswith("data:image/png;base64,")
