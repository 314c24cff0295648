#!/bin/sh
# Install the mqvox device from the wheels of its bundle into $MQVOX_PREFIX/venv (default
# /opt/mqvox). Run as root by the unit's ExecStartPre on every start: it does nothing
# once this exact wheel (by SHA-256) is installed, so a new bundle is installed at the
# next start, even one with the same version number.
#
# Dependencies come from $MQVOX_PREFIX/wheels first (drop aarch64 wheels there for an
# offline device: device/README.md says how), then from the package index.
# MQVOX_PIP_ARGS adds pip options, e.g. "--no-index" or "--index-url URL" of a mirror.
set -eu

prefix="${MQVOX_PREFIX:-/opt/mqvox}"
wheels="$prefix/wheels"
venv="$prefix/venv"
stamp="$venv/.mqvox-wheel"

wheel=""
for candidate in "$wheels"/mqvox-*.whl; do
    [ -e "$candidate" ] && wheel="$candidate"
done
if [ -z "$wheel" ]; then
    echo "install.sh: no mqvox wheel in $wheels" >&2
    exit 1
fi
digest="$(sha256sum "$wheel" | cut -d' ' -f1) $(basename "$wheel")"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$digest" ]; then
    exit 0
fi

if ! python3 -c "import ensurepip, venv" 2>/dev/null || ! ldconfig -p 2>/dev/null | grep -q libportaudio.so.2; then
    # Raspberry Pi OS and Debian: the venv module and PortAudio (for sounddevice) are packages.
    if command -v apt-get >/dev/null 2>&1; then
        apt-get install -y --no-install-recommends python3-venv libportaudio2
    fi
fi

echo "install.sh: installing $(basename "$wheel") into $venv"
python3 -m venv "$venv"
# This wheel even over an installed one of the same version, then whatever it needs.
# shellcheck disable=SC2086 # MQVOX_PIP_ARGS is a list of options
"$venv/bin/pip" install --disable-pip-version-check --force-reinstall --no-deps ${MQVOX_PIP_ARGS:-} "$wheel"
# shellcheck disable=SC2086
"$venv/bin/pip" install --disable-pip-version-check --find-links "$wheels" ${MQVOX_PIP_ARGS:-} "$wheel[device]"
# Then pyrnnoise without the file converter and plots it declares: the device loads only its librnnoise. The list
# is the wheel's own (firmware_tools/onboarding/deploy/requirements-no-deps.txt), so it matches the wheel's code.
no_deps="$(echo "$venv"/lib/python3*/site-packages/firmware_tools/onboarding/deploy/requirements-no-deps.txt)"
# shellcheck disable=SC2086
"$venv/bin/pip" install --disable-pip-version-check --no-deps --find-links "$wheels" ${MQVOX_PIP_ARGS:-} -r "$no_deps"
echo "$digest" > "$stamp"
echo "install.sh: done"
