#!/usr/bin/env bash
# The wheel as a user gets it: install dist/straightflow-*.whl (not editable) into a fresh virtual
# environment, then, from a directory outside the checkout (so the source tree cannot be imported),
# run `straightflow --version`, `straightflow list` and the README's ten-line example, and check the
# package data. Run `make dist` first. The pinned CPU torch is installed first, as the Makefile does
# (TORCH=... picks another build); pip's cache is reused.
# Usage: .ci/wheel_check.sh            (PYTHON, TORCH and WHEEL_CHECK_STEPS may be set)
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
PYTHON="${PYTHON:-python3}"
TORCH="${TORCH:-torch==2.13.0}"

shopt -s nullglob
wheels=("$ROOT"/dist/straightflow-*.whl)
if [ "${#wheels[@]}" -ne 1 ]; then
  echo "wheel check: expected exactly one dist/straightflow-*.whl, found ${#wheels[@]}: run 'make dist' first" >&2
  exit 2
fi
WHEEL="${wheels[0]}"

WORK="$(mktemp -d "${TMPDIR:-/tmp}/straightflow-wheel-check.XXXXXX")"
trap 'rm -rf "$WORK"' EXIT
case "$WORK" in "$ROOT"/*) echo "wheel check: the scratch directory $WORK is inside the checkout" >&2; exit 2;; esac

echo "wheel check: $(basename "$WHEEL") into a fresh venv in $WORK"
"$PYTHON" -m venv "$WORK/venv"
VBIN="$WORK/venv/bin"
"$VBIN/pip" install -q "$TORCH" || "$VBIN/pip" install -q "torch>=2.3"
"$VBIN/pip" install -q "$WHEEL"
echo "wheel check: installed in ${SECONDS}s"

# Outside the checkout, with nothing of it on the path: only the installed wheel can be imported.
cd "$WORK"
export STRAIGHTFLOW_CACHE="$WORK/cache"
unset PYTHONPATH STRAIGHTFLOW_MAX_STEPS

version_line="$("$VBIN/straightflow" --version)"
echo "$version_line"
wheel_version="$(basename "$WHEEL" | cut -d- -f2)"
case "$version_line" in
  "straightflow $wheel_version "*) ;;
  *) echo "wheel check: 'straightflow --version' says '$version_line', the wheel is $wheel_version" >&2; exit 1;;
esac

"$VBIN/straightflow" list > list.txt
grep -q "euler" list.txt || { echo "wheel check: 'straightflow list' names no solver 'euler':" >&2; cat list.txt >&2; exit 1; }
echo "straightflow list: $(wc -l < list.txt) lines"

"$VBIN/python" "$ROOT/.ci/wheel_check.py" --wheel "$WHEEL" --readme "$ROOT/README.md" --checkout "$ROOT" \
  --steps "${WHEEL_CHECK_STEPS:-20}"
echo "wheel check: passed (${SECONDS}s)"
