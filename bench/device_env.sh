# Sourced by the GPU scripts: pick the GPU machine's Python (python3, or $PYTHON), install the wheels it lacks from
# .whl/ (bench/fetch_wheels.sh, run where there is network; copy the folder along) into /tmp/site, put the repo on
# the path.
PY="${PYTHON:-python3}"
if compgen -G ".whl/*.whl" >/dev/null; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || exit 3
  export PYTHONPATH="/tmp/site:${PYTHONPATH:-}"
fi
export PYTHONPATH="$(pwd):${PYTHONPATH:-}" PYTHONUNBUFFERED=1
