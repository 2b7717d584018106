# Sourced by the scripts: make ./.venv (once) and install the project with the given extras.
# Usage: ensure_venv EXTRAS
ensure_venv() {
    local python="${PYTHON:-python3}"
    # .ci/run sets it once its set-up part has installed every extra: no pip beside running parts.
    if [ -n "${ASYNCSQL_VENV_MADE:-}" ] && [ -x .venv/bin/python ]; then
        return
    fi
    if [ ! -x .venv/bin/python ]; then
        "$python" -m venv .venv
        .venv/bin/python -m pip install --quiet --upgrade pip
    fi
    .venv/bin/python -m pip install --quiet --disable-pip-version-check -e ".[$1]"
}
