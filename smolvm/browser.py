"""BrowserSession: Chromium inside a SmolVM, driven over CDP (Playwright) from the host, ready from a snapshot."""

from __future__ import annotations

import os
import secrets
import shlex
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from types import TracebackType
from typing import Any

from . import browser_store as store
from . import snapshots
from ._paths import PACKAGE_DIR, data_dir
from .browser_config import BrowserSessionConfig
from .browser_store import BrowserSessionInfo
from .build._cache import digest, progress
from .errors import BrowserSessionError, BrowserSessionNotFoundError, SmolVMError, VMNotFoundError
from .vm import SmolVM

IMAGE = "browser"
CDP_PORT = 9222  # Chromium's DevTools port on the guest's loopback
LIVE_PORT = 6080  # websockify (noVNC's page and its WebSocket) on the guest's loopback
GUEST_ROOT = "/opt/smolvm-browser"
LAUNCHER = f"{GUEST_ROOT}/launcher.sh"
GUEST_ARTIFACTS = f"{GUEST_ROOT}/artifacts"
GUEST_DOWNLOADS = f"{GUEST_ROOT}/downloads"
GUEST_PROFILE = f"{GUEST_ROOT}/profile"
GUEST_LOGS = f"{GUEST_ROOT}/logs"
READY_TIMEOUT_S = 3600  # a cold Chromium start is minutes on hosts that emulate guest ring 0 (more when loaded)
HOST_CDP_TIMEOUT_S = 60.0
COMPAT_BOOT_TIMEOUT_S = 1800.0
PLAYWRIGHT_TIMEOUT_MS = 30_000  # Playwright's own default
COMPAT_PLAYWRIGHT_TIMEOUT_MS = 600_000  # where guest ring 0 is emulated a page load takes minutes
SNAPSHOT_VERSION = b"browser-snap-v1"
PLAYWRIGHT_HINT = 'pip install "smolvm[browser]" (or: pip install playwright)'
_NO_PROXY = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def browser_packages() -> list[str]:
    """The browser image's packages: the default image's plus guest/image/browser-packages.txt."""
    from .build.image import default_packages

    text = (data_dir("guest") / "image" / "browser-packages.txt").read_text()
    extra = [ln.split("#", 1)[0].strip() for ln in text.splitlines() if ln.split("#", 1)[0].strip()]
    return sorted(set(default_packages()) | set(extra))


def ensure_browser_image() -> Path:
    """The browser image (Chromium, fonts, Xvfb, x11vnc, noVNC, ffmpeg), built on first use."""
    from .build.image import ensure_image

    return ensure_image(IMAGE, browser_packages())


def launcher_script() -> bytes:
    return (PACKAGE_DIR / "browser_guest.sh").read_bytes()


def snapshot_key(config: BrowserSessionConfig) -> str:
    """Key of the browser base snapshot of a configuration: the VM's base snapshot key (kernel,
    initramfs, image, VMM, memory, profile), the launcher, and what the running browser depends on."""
    from ._native import vmm_path
    from .build.initramfs import ensure_initramfs
    from .build.kernel import ensure_kernel
    from .profile import detect
    from .vm import base_key

    image_file = ensure_browser_image()
    vm_key = base_key(
        ensure_kernel() / "vmlinux", ensure_initramfs(with_busybox=False), image_file,
        config.mem_size_mib, 1, vmm_path(), detect(),
    )  # fmt: skip
    parts = [SNAPSHOT_VERSION, vm_key.encode(), launcher_script(), config.mode.encode(),
             f"{config.viewport_width}x{config.viewport_height}".encode(),
             str(config.disk_size_mib).encode(), str(config.allow_downloads).encode(),
             os.environ.get("SMOLVM_BROWSER_FLAGS", "").encode()]  # fmt: skip
    return digest(parts)


def snapshot_dir(key: str) -> Path:
    return snapshots.root() / ".browser" / key


def _new_id() -> str:
    return "browser-" + secrets.token_hex(4)


class BrowserSession:
    """A Chromium browser in its own microVM, reached over CDP on the host's 127.0.0.1.

    >>> with BrowserSession(BrowserSessionConfig(viewport={"width": 1280, "height": 720})) as s:
    ...     page = s.connect_playwright().contexts[0].pages[0]
    ...     page.goto("file:///opt/page.html"); s.screenshot("shot.png")

    The first session of a configuration (image, mode, viewport, memory, disk, downloads)
    boots a VM, starts Chromium, waits until it has loaded a blank page and saves that as
    the configuration's browser base snapshot; later sessions restore it and are ready when
    CDP answers. `with` gives a session that ends with the block (and with this process);
    start() outside `with` gives one that lasts until stop() or timeout_minutes, reachable
    from other processes with BrowserSession.from_id().
    """

    def __init__(self, config: BrowserSessionConfig | None = None) -> None:
        if config is None:
            config = BrowserSessionConfig()
        if not isinstance(config, BrowserSessionConfig):
            raise TypeError(f"config must be a BrowserSessionConfig, not {type(config).__name__}")
        if config.session_id is None:
            config = config.replace(session_id=_new_id())
        assert config.session_id is not None
        self._config = config
        self._vm: SmolVM | None = None
        self._playwright: Any = None
        self._browser: Any = None
        self._owned = True  # this handle made the session (from_id() handles did not)
        self._info = BrowserSessionInfo(
            session_id=config.session_id, vm_id=None, status="created", mode=config.mode,
            profile_id=config.profile_id, created=time.time(),
            artifacts_dir=str(store.artifacts_dir(config.session_id)), config=config.to_dict(),
        )  # fmt: skip

    # ---- what the session is ----------------------------------------------------------

    @property
    def session_id(self) -> str:
        return self._info.session_id

    @property
    def vm_id(self) -> str | None:
        return self._info.vm_id

    @property
    def vm(self) -> SmolVM:
        """The SmolVM the browser runs in (session.vm.run("ls /opt/smolvm-browser/downloads"))."""
        if self._vm is None:
            raise BrowserSessionError(f"browser session {self.session_id} has no VM: call start() first")
        return self._vm

    @property
    def config(self) -> BrowserSessionConfig:
        return self._config

    @property
    def status(self) -> str:
        """created, starting, ready, stopping, stopped or error."""
        return self._info.status

    @property
    def cdp_url(self) -> str | None:
        """http://127.0.0.1:PORT: Chromium's DevTools endpoint (Playwright's connect_over_cdp)."""
        return self._info.cdp_url

    browser_cdp_url = cdp_url

    @property
    def live_url(self) -> str | None:
        """The noVNC page showing the live display (mode='live'), else None."""
        return self._info.live_url

    viewer_url = live_url

    @property
    def artifacts_dir(self) -> Path:
        return Path(self._info.artifacts_dir)

    @property
    def info(self) -> BrowserSessionInfo:
        return self._info

    def __repr__(self) -> str:
        return (f"BrowserSession(session_id={self.session_id!r}, status={self.status!r}, "
                f"mode={self._config.mode!r}, cdp_url={self.cdp_url!r}, live_url={self.live_url!r})")  # fmt: skip

    # ---- lifecycle ----------------------------------------------------------------------

    def __enter__(self) -> BrowserSession:
        if self._info.status == "created":
            self._start(persistent=False)
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None,
    ) -> None:  # fmt: skip
        if self._owned:
            self.stop()
        else:
            self.close()

    def start(self) -> BrowserSession:
        """Start the session and wait until its browser answers on cdp_url. No-op if ready.

        Outside `with`, the session outlives this process: stop() (or `smolvm browser stop`,
        or timeout_minutes) ends it, BrowserSession.from_id() reaches it from elsewhere.
        """
        if self._info.status == "ready":
            return self
        return self._start(persistent=True)

    def _start(self, persistent: bool) -> BrowserSession:
        if self._info.status not in ("created",):
            raise BrowserSessionError(
                f"browser session {self.session_id} is {self._info.status}; make a new BrowserSession"
            )
        if store.exists(self.session_id):
            raise BrowserSessionError(
                f"a browser session {self.session_id!r} already exists: stop it "
                f"(`smolvm browser stop {self.session_id}`) or choose another session_id"
            )
        cfg = self._config
        info = self._info
        info.status, info.persistent, info.owner_pid = "starting", persistent, os.getpid()
        info.expires_at = time.time() + cfg.timeout_minutes * 60
        store.save(info)
        try:
            self._vm = self._ready_vm(persistent)
            info.vm_id = self._vm.vm_id
            store.save(info)
            if cfg.profile_mode == "persistent":
                self._load_profile()
            if cfg.env_vars:
                self._vm.set_env(dict(cfg.env_vars))
            self._expose()
            if cfg.record_video:
                self._guest("record-start", str(cfg.viewport_width), str(cfg.viewport_height))
            info.status = "ready"
            info.reaper_pid = _spawn_reaper(self.session_id)
            store.save(info)
        except BaseException:
            info.status = "error"
            vm, self._vm = self._vm, None
            if vm is not None:
                try:
                    vm.delete()
                except SmolVMError:
                    pass
            store.remove(self.session_id)
            raise
        return self

    def _ready_vm(self, persistent: bool) -> SmolVM:
        """A VM whose Chromium has a blank page loaded: restored from the browser base snapshot,
        or booted (and then saved as that snapshot)."""
        cfg = self._config
        key = snapshot_key(cfg)
        snap = snapshot_dir(key)
        if snapshots.complete(snap) and snapshots.problem(snap) is None:
            vm = SmolVM.from_snapshot_dir(snap)
            self._start_vm(vm, persistent)
            return vm
        if snap.exists():
            progress(f"the browser snapshot {snap} is damaged ({snapshots.problem(snap)}); making it again")
            shutil.rmtree(snap, ignore_errors=True)
        ensure_browser_image()
        progress(
            f"starting Chromium in a new {cfg.mem_size_mib} MiB VM to make the browser snapshot of this "
            f"configuration ({cfg.mode}, {cfg.viewport_width}x{cfg.viewport_height}); once per "
            "configuration, minutes on hosts that emulate guest ring 0"
        )
        vm = SmolVM(memory=cfg.mem_size_mib, image=IMAGE, disk_size=cfg.disk_size_mib, boot_timeout=_boot_timeout())
        self._start_vm(vm, persistent)
        try:
            self._vm = vm
            t0 = time.monotonic()
            self._launch(vm)
            progress(f"Chromium ready in the guest after {time.monotonic() - t0:.0f} s; saving the browser snapshot")
            vm.snapshot_to(snap)
            progress(f"saved the browser snapshot {snap}; later sessions of this configuration restore it")
        except BaseException:
            vm.delete()
            raise
        return vm

    @staticmethod
    def _start_vm(vm: SmolVM, persistent: bool) -> None:
        if persistent:
            vm.start()
        else:
            vm.__enter__()  # ephemeral: ends with its handle and with this process

    def _launch(self, vm: SmolVM) -> None:
        """Put the launcher into the guest and start Chromium; wait until it shows a page."""
        cfg = self._config
        vm.run(f"mkdir -p {GUEST_ROOT}", timeout=120)
        tmp = Path(os.environ.get("TMPDIR", "/tmp")) / f"smolvm-browser-launcher-{os.getpid()}.sh"
        tmp.write_bytes(launcher_script())
        try:
            vm.upload_file(tmp, LAUNCHER, mode=0o755)
        finally:
            tmp.unlink(missing_ok=True)
        self._guest("start", cfg.mode, str(cfg.viewport_width), str(cfg.viewport_height),
                    str(CDP_PORT), str(LIVE_PORT), "1" if cfg.allow_downloads else "0", vm=vm)  # fmt: skip
        self._guest("wait-ready", str(CDP_PORT), str(READY_TIMEOUT_S), vm=vm, timeout=READY_TIMEOUT_S + 60)
        if cfg.mode == "live":
            self._guest("wait-port", str(LIVE_PORT), "600", vm=vm, timeout=660)

    def _guest(self, *args: str, vm: SmolVM | None = None, timeout: float = 300) -> str:
        vm = vm or self.vm
        r = vm.run(shlex.join([LAUNCHER, *args]), timeout=timeout)
        if not r.ok:
            raise BrowserSessionError(
                f"browser session {self.session_id}: `{args[0]}` failed in the guest "
                f"(exit {r.exit_code}{', timed out' if r.timed_out else ''}): {(r.stderr or r.stdout).strip()[-2000:]}"
                f"\nsee `smolvm browser logs {self.session_id}` or session.logs()"
            )
        return r.stdout

    def _expose(self) -> None:
        """Forward CDP (and the live view) to fresh ports on the host's 127.0.0.1."""
        expose = self.vm.expose_local
        info = self._info
        info.debug_port = int(expose(CDP_PORT))
        info.cdp_url = f"http://127.0.0.1:{info.debug_port}"
        if self._config.mode == "live":
            info.live_port = int(expose(LIVE_PORT))
            info.live_url = f"http://127.0.0.1:{info.live_port}/vnc.html?autoconnect=true&resize=scale"
        _wait_cdp(info.cdp_url, _host_cdp_timeout_s())

    def _load_profile(self) -> None:
        """A persistent profile kept on the host replaces the snapshot's blank one."""
        assert self._config.profile_id is not None
        archive = store.profile_archive(self._config.profile_id)
        if not archive.exists():
            return
        cfg = self._config
        self._guest("stop-browser")
        self.vm.upload_file(archive, "/tmp/profile.tar.gz")
        r = self.vm.run(f"rm -rf {GUEST_PROFILE} && mkdir -p {GUEST_PROFILE} && "
                        f"tar -xzf /tmp/profile.tar.gz -C {GUEST_PROFILE} && rm -f /tmp/profile.tar.gz "
                        f"{GUEST_PROFILE}/Singleton*", timeout=300)  # fmt: skip
        if not r.ok:
            raise BrowserSessionError(f"could not unpack the kept profile {archive}: {r.stderr.strip()}")
        self._guest("start", cfg.mode, str(cfg.viewport_width), str(cfg.viewport_height),
                    str(CDP_PORT), str(LIVE_PORT), "1" if cfg.allow_downloads else "0")  # fmt: skip
        self._guest("wait-ready", str(CDP_PORT), str(READY_TIMEOUT_S), timeout=READY_TIMEOUT_S + 60)

    def _save_profile(self) -> None:
        assert self._config.profile_id is not None
        self._guest("stop-browser", timeout=120)
        r = self.vm.run(f"tar -czf /tmp/profile.tar.gz -C {GUEST_PROFILE} --exclude='Singleton*' "
                        "--exclude=Crashpad --exclude='*Cache*' .", timeout=300)  # fmt: skip
        if not r.ok:
            raise BrowserSessionError(f"could not pack the profile {self._config.profile_id}: {r.stderr.strip()}")
        self.vm.download_file("/tmp/profile.tar.gz", store.profile_archive(self._config.profile_id))

    def stop(self) -> None:
        """End the session: finalise the recording, collect the artifacts, keep a persistent
        profile, and delete the VM. Idempotent."""
        info = self._info
        if info.status in ("stopped", "created"):
            info.status = "stopped"
            return
        info.status = "stopping"
        if store.exists(self.session_id):
            store.save(info)
        try:
            if self._vm is not None and self._vm.status == "running":
                try:
                    if self._config.record_video:
                        self._guest("record-stop", timeout=120)
                    self.collect_artifacts()
                    if self._config.profile_mode == "persistent":
                        self._save_profile()
                except SmolVMError as e:
                    progress(f"browser session {self.session_id}: while stopping: {e}")
        finally:
            self._close_playwright()
            if self._vm is not None:
                self._vm.delete()
                self._vm = None
            elif info.vm_id:
                try:
                    SmolVM.from_id(info.vm_id).delete()
                except VMNotFoundError:
                    pass
            _stop_reaper(info.reaper_pid)
            store.remove(self.session_id)
            info.status = "stopped"

    def delete(self) -> None:
        """Same as stop()."""
        self.stop()

    def close(self) -> None:
        """Let go of this handle. A session made in `with` (ephemeral) ends as with stop()
        (recording finalised, artifacts collected); one made with start() or reached with
        from_id() keeps running until stop()."""
        if self._owned and not self._info.persistent and self._vm is not None:
            self.stop()
            return
        self._close_playwright()
        if self._vm is not None:
            self._vm.close()
            self._vm = None

    def __del__(self) -> None:
        try:
            self._close_playwright()
        except Exception:
            pass

    # ---- driving the browser ---------------------------------------------------------

    def connect_playwright(self) -> Any:
        """Playwright's sync Browser connected over CDP (chromium.connect_over_cdp(cdp_url)).

        Its contexts[0].pages[0] is the session's blank page. Needs `pip install "smolvm[browser]"`.
        """
        try:
            from playwright.sync_api import sync_playwright
        except ImportError:
            raise ImportError(f"connect_playwright() needs Playwright: {PLAYWRIGHT_HINT}") from None
        if self._info.status != "ready" or self.cdp_url is None:
            raise BrowserSessionError(
                f"browser session {self.session_id} is {self._info.status}, not ready: call start() first"
            )
        if self._browser is not None and self._browser.is_connected():
            return self._browser
        if self._playwright is None:
            self._playwright = sync_playwright().start()
        timeout_ms = _playwright_timeout_ms()
        self._browser = self._playwright.chromium.connect_over_cdp(self.cdp_url, timeout=timeout_ms)
        if timeout_ms > PLAYWRIGHT_TIMEOUT_MS:
            for context in self._browser.contexts:
                context.set_default_timeout(timeout_ms)
        return self._browser

    def page(self) -> Any:
        """The session's current Playwright page (the first of the first context; made if none)."""
        browser = self.connect_playwright()
        context = browser.contexts[0] if browser.contexts else browser.new_context()
        return context.pages[0] if context.pages else context.new_page()

    def screenshot(self, path: str | os.PathLike[str] | None = None, *, full_page: bool = True) -> bytes:
        """A PNG of the current page (viewport-sized unless full_page and the page is longer);
        also written to path if given."""
        data: bytes = self.page().screenshot(full_page=full_page)
        if path is not None:
            out = Path(path)
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_bytes(data)
        return data

    def push_file(self, local_path: str | os.PathLike[str], guest_path: str) -> int:
        """Copy a host file into the guest (e.g. a page to open as file:///...)."""
        folder = guest_path.rsplit("/", 1)[0] or "/"
        self.vm.run(f"mkdir -p {shlex.quote(folder)}", timeout=60)
        return self.vm.upload_file(local_path, guest_path)

    def pull_file(self, guest_path: str, local_path: str | os.PathLike[str]) -> Path:
        return self.vm.download_file(guest_path, local_path)

    def collect_artifacts(self) -> Path:
        """Copy the downloads, the recording (final once stop() ran) and the browser logs into
        artifacts_dir on the host, and return it. After stop() (or close() of a `with`
        session) it returns what was collected as the session ended."""
        dest = self.artifacts_dir
        dest.mkdir(parents=True, exist_ok=True)
        if self._vm is None and self._info.status == "stopped":
            return dest  # stop() collected them as the session ended
        r = self.vm.run(f"cd {GUEST_ROOT} && find artifacts downloads logs -type f -size -2000M 2>/dev/null",
                        timeout=120)  # fmt: skip
        for rel in r.stdout.split("\n"):
            rel = rel.strip()
            if not rel or ".." in rel.split("/") or rel.endswith((".crdownload", ".part")):
                continue
            top, _, rest = rel.partition("/")
            local = dest / (rest if top == "artifacts" else rel)
            local.parent.mkdir(parents=True, exist_ok=True)
            self.vm.download_file(f"{GUEST_ROOT}/{rel}", local)
        return dest

    def logs(self, tail: int = 100) -> str:
        """The last `tail` lines of each browser log in the guest (Chromium, Xvfb, x11vnc, ...),
        then of the VM's console."""
        n = max(1, int(tail))
        chunks = []
        if self._vm is not None and self._vm.status == "running":
            r = self._vm.run(f'for f in {GUEST_LOGS}/*.log; do [ -f "$f" ] || continue; '
                             f'echo "== $f =="; tail -n {n} "$f"; done', timeout=60)  # fmt: skip
            chunks.append(r.stdout.rstrip())
            console = self._vm.console_log
            if console.exists():
                lines = console.read_text(errors="replace").splitlines()[-n:]
                chunks.append(f"== console ({console}) ==\n" + "\n".join(lines))
        return "\n".join(c for c in chunks if c)

    def _close_playwright(self) -> None:
        browser, pw = self._browser, self._playwright
        self._browser = self._playwright = None
        if browser is not None:
            try:
                browser.close()
            except Exception:
                pass
        if pw is not None:
            try:
                pw.stop()
            except Exception:
                pass

    # ---- other processes ------------------------------------------------------------

    @classmethod
    def from_id(cls, session_id: str) -> BrowserSession:
        """A handle on a running session, from any process on this machine. close() on it leaves
        the session running; stop() ends it."""
        info = store.load(session_id)
        if info.status != "ready" or not info.vm_id:
            raise BrowserSessionNotFoundError(f"browser session {session_id!r} is {info.status}, not ready")
        try:
            vm = SmolVM.from_id(info.vm_id)
        except VMNotFoundError:
            store.remove(session_id)
            raise BrowserSessionNotFoundError(
                f"browser session {session_id!r} is gone: its VM {info.vm_id} no longer runs"
            ) from None
        s = cls(BrowserSessionConfig.from_dict(info.config))
        s._info, s._vm, s._owned = info, vm, False
        return s

    @staticmethod
    def list() -> list[BrowserSessionInfo]:
        """The browser sessions on this machine (records of sessions whose VM is gone are removed)."""
        from . import registry

        out = []
        for info in store.scan():
            if info.status in ("ready", "stopping") and info.vm_id:
                try:
                    if not registry.alive(registry.load(info.vm_id)):
                        raise VMNotFoundError(info.vm_id)
                except VMNotFoundError:
                    store.remove(info.session_id)
                    continue
            elif info.status == "starting" and not _pid_alive(info.owner_pid):
                store.remove(info.session_id)
                continue
            out.append(info)
        return out


def _boot_timeout() -> float:
    """SMOLVM_BOOT_TIMEOUT, but at least COMPAT_BOOT_TIMEOUT_S where guest ring 0 is emulated: a
    2 GiB guest with the browser image took over 600 s to boot on a loaded 2-core host there."""
    from . import _validate
    from .profile import detect

    t = _validate.boot_timeout(None)
    return max(t, COMPAT_BOOT_TIMEOUT_S) if detect().compat else t


def _emulated() -> bool:
    """Off native hardware: guest ring 0 emulated (compat) or the VMMs one level down (nested,
    where a restored Chromium's first page faults cross 9p). Waits for Chromium are longer there."""
    from .profile import detect

    return detect().name != "native"


def _playwright_timeout_ms() -> int:
    """Playwright's default (30 s), or COMPAT_PLAYWRIGHT_TIMEOUT_MS off native hardware."""
    return COMPAT_PLAYWRIGHT_TIMEOUT_MS if _emulated() else PLAYWRIGHT_TIMEOUT_MS


def _host_cdp_timeout_s() -> float:
    return 10 * HOST_CDP_TIMEOUT_S if _emulated() else HOST_CDP_TIMEOUT_S


def _wait_cdp(url: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    last = ""
    while time.monotonic() < deadline:
        try:
            with _NO_PROXY.open(url + "/json/version", timeout=10) as r:
                if r.status == 200:
                    return
        except (OSError, urllib.error.URLError) as e:
            last = str(e)
        time.sleep(0.2)
    raise BrowserSessionError(f"Chromium's DevTools endpoint {url} did not answer within {timeout:.0f} s ({last})")


def _pid_alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _spawn_reaper(session_id: str) -> int:
    """A host process that stops the session when its timeout_minutes are over."""
    env = dict(os.environ)
    env["PYTHONPATH"] = str(PACKAGE_DIR.parent) + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.Popen(
        [sys.executable, "-m", "smolvm.browser_reaper", session_id],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        start_new_session=True, env=env, close_fds=True,
    )  # fmt: skip
    return proc.pid


def _stop_reaper(pid: int) -> None:
    if pid <= 0 or pid == os.getpid():
        return
    try:
        os.kill(pid, signal.SIGTERM)
    except (ProcessLookupError, PermissionError):
        return
    try:
        os.waitpid(pid, 0)  # our child: reap it
    except ChildProcessError:
        pass
