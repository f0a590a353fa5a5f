#!/usr/bin/env bash
# Set up, then run the whole test suite twice: the normal build, then the same tests built with ASan+UBSan.
# Arguments, if any, replace `tests` as what pytest runs (e.g. scripts/test.sh tests/test_vm.py).
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD
targets=("$@")
[ ${#targets[@]} -gt 0 ] || targets=(tests)

./scripts/setup.sh

export PYTHONSAFEPATH=1 # import the installed smolvm, never ./smolvm

run_pytest() {
  local rc=0
  python3 -m pytest -v "$@" "${targets[@]}" || rc=$?
  if [ "$rc" = 5 ]; then
    echo "test.sh: pytest collected no tests" >&2
    return 1
  fi
  return "$rc"
}

profile=$(cd / && python3 -c 'from smolvm.profile import detect; print(detect().name)')
echo "=== test.sh: tests against the normal build (profile: $profile)"
run_pytest

if [ "$profile" = nested ] && [ -z "${SMOLVM_PROFILE:-}" ]; then
  # The suite ran in the nested profile's host VM; the tests about this host's own KVM
  # (the compat profile: its kernel arguments, the VMM's XSAVE service) run here once more.
  echo "=== test.sh: the compat profile's tests against this host's own KVM"
  SMOLVM_PROFILE=compat run_pytest -m profile_compat
  (cd / && python3 -m smolvm rm --all >/dev/null 2>&1) || true
fi

echo "=== test.sh: building with SMOLVM_SANITIZE=1 (ASan+UBSan) into build/asan-site"
asan_site=$root/build/asan-site
rm -rf "$asan_site"
SMOLVM_SANITIZE=1 python3 -m pip install --quiet --disable-pip-version-check --root-user-action=ignore \
  --no-deps --target "$asan_site" .

logs=$(mktemp -d /tmp/smolvm-asan.XXXXXX)
# Tests marked guest_only drive guest programs (python3, pip) through host code the other tests
# already cover; on hosts that emulate guest ring 0 they take minutes, so they run once.
echo "=== test.sh: the same tests under ASan+UBSan, except guest_only ones (reports go to $logs)"
rc=0
PYTHONPATH="$asan_site" \
  LD_PRELOAD="$(gcc -print-file-name=libasan.so)" \
  ASAN_OPTIONS="detect_leaks=0:log_path=$logs/asan" \
  UBSAN_OPTIONS="print_stacktrace=1:halt_on_error=1:log_path=$logs/ubsan" \
  run_pytest -m "not guest_only" || rc=$?
if compgen -G "$logs/*" >/dev/null; then
  echo "test.sh: sanitizer reports:" >&2
  for f in "$logs"/*; do echo "--- $f" >&2; cat "$f" >&2; done
  rc=1
fi
(cd / && python3 -m smolvm host stop >/dev/null 2>&1) || true  # the nested profile's host VM, if any
exit "$rc"
