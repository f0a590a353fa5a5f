#!/bin/sh
# Guest side of a BrowserSession: starts and stops Chromium (and, live, Xvfb/x11vnc/websockify, ffmpeg) detached.
#
#   browser_guest.sh start MODE WIDTH HEIGHT CDP_PORT LIVE_PORT ALLOW_DOWNLOADS
#   browser_guest.sh wait-ready CDP_PORT SECONDS   # exit 0 once CDP answers and a page is loaded
#   browser_guest.sh record-start WIDTH HEIGHT     # ffmpeg x11grab of :99 into artifacts/
#   browser_guest.sh record-stop                   # SIGINT to ffmpeg: the file is finalised
#   browser_guest.sh stop-browser                  # Chromium only (its profile is then complete)
#   browser_guest.sh stop                          # everything
#
# The agent ends a command when its shell exits, and kills the command's process group when
# the host connection closes, so every long-running process here is started with setsid in a
# session of its own, its output going to a log file under $ROOT/logs.
set -eu

ROOT=/opt/smolvm-browser
PROFILE=$ROOT/profile
DOWNLOADS=$ROOT/downloads
ARTIFACTS=$ROOT/artifacts
LOGS=$ROOT/logs
RUN=$ROOT/run
DISPLAY_NUM=99
VNC_PORT=5900
POLICY_DIR=/etc/chromium/policies/managed
CHROMIUM=/usr/lib/chromium/chromium # the binary itself: Debian's /usr/bin/chromium wrapper is a shell script
[ -x "$CHROMIUM" ] || CHROMIUM=chromium

mkdir -p "$PROFILE" "$DOWNLOADS" "$ARTIFACTS" "$LOGS" "$RUN"

detach() { # NAME CMD...: run CMD in its own session, pid in $RUN/NAME.pid, output in $LOGS/NAME.log
	name=$1
	shift
	setsid "$@" </dev/null >"$LOGS/$name.log" 2>&1 &
	echo $! >"$RUN/$name.pid"
}

alive() { [ -f "$RUN/$1.pid" ] && kill -0 "$(cat "$RUN/$1.pid")" 2>/dev/null; }

stop_one() { # NAME SIGNAL SECONDS: signal, wait, then SIGKILL
	[ -f "$RUN/$1.pid" ] || return 0
	pid=$(cat "$RUN/$1.pid")
	kill "-$2" "$pid" 2>/dev/null || true
	n=0
	while kill -0 "$pid" 2>/dev/null && [ "$n" -lt "$(($3 * 10))" ]; do
		sleep 0.1
		n=$((n + 1))
	done
	kill -KILL "$pid" 2>/dev/null || true
	rm -f "$RUN/$1.pid"
}

policies() { # ALLOW_DOWNLOADS
	mkdir -p "$POLICY_DIR"
	if [ "$1" = 1 ]; then restrict=0; else restrict=3; fi
	cat >"$POLICY_DIR/smolvm.json" <<EOF
{"DownloadDirectory": "$DOWNLOADS", "PromptForDownloadLocation": false,
 "DownloadRestrictions": $restrict, "DefaultBrowserSettingEnabled": false,
 "MetricsReportingEnabled": false, "BackgroundModeEnabled": false}
EOF
}

wait_port() { # PORT SECONDS: until something listens on 127.0.0.1:PORT (from /proc/net/tcp)
	hex=$(printf ':%04X' "$1")
	n=0
	while ! grep -q "^ *[0-9]*: 0100007F$hex 00000000:0000 0A\|^ *[0-9]*: 00000000$hex 00000000:0000 0A" /proc/net/tcp; do
		n=$((n + 1))
		[ "$n" -lt "$(($2 * 5))" ] || return 1
		sleep 0.2
	done
}

start() { # MODE WIDTH HEIGHT CDP_PORT LIVE_PORT ALLOW_DOWNLOADS
	mode=$1 width=$2 height=$3 cdp=$4 live=$5
	policies "$6"
	rm -f "$PROFILE"/Singleton* # a profile from another VM (its hostname) would look locked
	set -- \
		--no-sandbox \
		--no-first-run --no-default-browser-check --disable-sync --disable-extensions \
		--disable-background-networking --disable-component-update --disable-breakpad \
		--disable-default-apps --disable-domain-reliability --metrics-recording-only --no-pings \
		--password-store=basic --use-mock-keychain --mute-audio \
		--disable-dev-shm-usage --disable-gpu --in-process-gpu \
		--no-zygote --renderer-process-limit=1 --disable-site-isolation-trials \
		--disable-features=site-per-process,IsolateOrigins,Translate,OptimizationHints,MediaRouter,DialMediaRouteProvider,AutofillServerCommunication,CertificateTransparencyComponentUpdater \
		--remote-debugging-address=127.0.0.1 --remote-debugging-port="$cdp" --remote-allow-origins='*' \
		--user-data-dir="$PROFILE" --window-size="$width,$height" --window-position=0,0 \
		${SMOLVM_BROWSER_FLAGS:-}
	if [ "$mode" = live ]; then
		if ! alive xvfb; then
			detach xvfb Xvfb ":$DISPLAY_NUM" -screen 0 "${width}x${height}x24" -nolisten tcp -ac
			n=0
			until [ -e /tmp/.X11-unix/X$DISPLAY_NUM ]; do
				n=$((n + 1))
				[ "$n" -lt 1500 ] || { echo "Xvfb did not start: $(tail -5 "$LOGS/xvfb.log")" >&2; exit 1; }
				sleep 0.2
			done
		fi
		alive x11vnc || detach x11vnc x11vnc -display ":$DISPLAY_NUM" -localhost -rfbport "$VNC_PORT" \
			-nopw -forever -shared -noxdamage -quiet
		alive websockify || detach websockify websockify --web=/usr/share/novnc "127.0.0.1:$live" "127.0.0.1:$VNC_PORT"
		detach chromium env DISPLAY=":$DISPLAY_NUM" "$CHROMIUM" "$@" --kiosk about:blank
	else
		detach chromium "$CHROMIUM" --headless=new "$@" about:blank
	fi
}

uptime_s() { read -r up _ </proc/uptime && echo "${up%.*}"; }

wait_ready() { # CDP_PORT SECONDS
	deadline=$(($(uptime_s) + $2))
	while :; do
		if out=$(curl -fsS --max-time 5 "http://127.0.0.1:$1/json/list" 2>/dev/null) &&
			printf '%s' "$out" | grep -q '"type": "page"'; then
			return 0
		fi
		if ! alive chromium; then
			echo "chromium exited before its DevTools port answered; last lines of its log:" >&2
			tail -20 "$LOGS/chromium.log" >&2
			exit 3
		fi
		[ "$(uptime_s)" -lt "$deadline" ] || { echo "chromium's DevTools port $1 did not answer within $2 s" >&2; exit 4; }
		sleep 1
	done
}

case "${1:-}" in
start) shift; start "$@" ;;
wait-ready) wait_ready "$2" "$3" ;;
wait-port) wait_port "$2" "$3" ;;
record-start)
	alive ffmpeg || detach ffmpeg ffmpeg -nostdin -loglevel warning -y -f x11grab -draw_mouse 1 \
		-video_size "$2x$3" -framerate 10 -i ":$DISPLAY_NUM" -c:v libx264 -preset ultrafast \
		-pix_fmt yuv420p "$ARTIFACTS/recording.mp4"
	;;
record-stop) stop_one ffmpeg INT 60 ;;
stop-browser) stop_one chromium TERM 20 ;;
stop)
	stop_one ffmpeg INT 60
	stop_one chromium TERM 20
	for p in websockify x11vnc xvfb; do stop_one $p TERM 5; done
	;;
*) echo "usage: $0 start|wait-ready|wait-port|record-start|record-stop|stop-browser|stop ..." >&2; exit 2 ;;
esac
