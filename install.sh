#!/usr/bin/env bash
# Sets up this checkout on a fresh Debian/Ubuntu machine with Python 3.11: Debian's Fashion-MNIST
# (the default real dataset, read offline) and a virtualenv .venv with selabel_tf and its test extras.
# Safe to run again: it only installs what is missing.
set -euo pipefail
cd "$(dirname "$0")"

if [ ! -f /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz ]; then
  if command -v apt-get >/dev/null 2>&1; then
    sudo=""
    [ "$(id -u)" -eq 0 ] || sudo="sudo"
    $sudo apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq dataset-fashion-mnist >/dev/null
  else
    echo "install.sh: no apt-get; Fashion-MNIST must come from a prepared tfds data dir instead" >&2
  fi
fi

python=${PYTHON:-}
if [ -z "$python" ]; then
  python=$(command -v python3.11 || command -v python3)
fi
[ -x .venv/bin/python ] || "$python" -m venv .venv
.venv/bin/python -m pip install -q --disable-pip-version-check --upgrade pip 2>&1 | grep -v "^WARNING: Location" || true
.venv/bin/python -m pip install -q --disable-pip-version-check -e ".[test]" 2>&1 | grep -v "^WARNING: Location" || true
.venv/bin/python -c "import selabel_tf, tensorflow, keras, tensorflow_datasets, scipy, sklearn, ot" \
  || { echo "install.sh: the virtualenv .venv is incomplete" >&2; exit 1; }
