# Sourced by gpu_check.sh and gpu_profile.sh: put the checkout, and on a GPU the wheels carried in
# $CARRY/wheels (the device machine has no network), on PYTHONPATH; DATA: the carried Office, else
# ../shared/data/Office. Expects CARRY and DEV to be set.
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD"
if [ -d "$CARRY/wheels" ] && [ "$DEV" = cuda ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
    "$CARRY"/wheels/*.whl || exit 1
  export PYTHONPATH="$PWD:/tmp/site"
fi
DATA=$CARRY/Office
[ -d "$DATA" ] || DATA=../shared/data/Office
