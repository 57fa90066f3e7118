#!/usr/bin/env bash
# The system tools the test suite needs besides the venv: sox (with its ogg/flac/mp3 formats) and espeak-ng write
# the real mixed-rate audio files that the audio-loading and end-to-end conversion tests decode.
# Installs them with apt-get where it can (root, or passwordless sudo); otherwise stops with the one command to run.
# Called by `make setup` and by .ci/run; prints nothing when everything is there.
set -euo pipefail

PACKAGES="sox libsox-fmt-all espeak-ng"
INSTALL="sudo apt-get install -y $PACKAGES"

missing() {
  local out=()
  command -v espeak-ng >/dev/null 2>&1 || out+=(espeak-ng)
  if ! command -v sox >/dev/null 2>&1; then
    out+=(sox)
  else
    # sox without libsox-fmt-* reads wav only; the tests write ogg, flac and mp3
    local formats
    formats=$(sox -h 2>/dev/null | sed -n 's/^AUDIO FILE FORMATS: //p')
    for f in ogg flac mp3; do
      [[ " $formats " == *" $f "* ]] || out+=("sox-format-$f")
    done
  fi
  echo "${out[*]-}"
}

need=$(missing)
[ -z "$need" ] && exit 0

if command -v apt-get >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ]; then
    apt_get=(apt-get)
  elif command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
    apt_get=(sudo -n apt-get)
  fi
fi
if [ -n "${apt_get+x}" ]; then
  echo "installing system packages for the tests ($need missing): $PACKAGES"
  export DEBIAN_FRONTEND=noninteractive
  "${apt_get[@]}" update -qq
  "${apt_get[@]}" install -y -qq --no-install-recommends $PACKAGES >/dev/null
  need=$(missing)
  [ -z "$need" ] && exit 0
  echo "error: still missing after apt-get install: $need" >&2
  exit 1
fi

echo "error: the tests need system packages that are not installed: $need" >&2
echo "run this once, then make test again:" >&2
echo "    $INSTALL" >&2
echo "(not Debian/Ubuntu? install sox with its ogg/flac/mp3 formats and espeak-ng with your package manager," >&2
echo " e.g. 'brew install sox espeak-ng')" >&2
exit 1
