#!/bin/sh
# Fashion-MNIST for the demo: Debian's dataset-fashion-mnist package when we are root.
# Never fails: the tests do not need the data, and the demo says what is missing.
DIR=/usr/share/datasets/fashion-mnist
if [ -f "$DIR/train-images-idx3-ubyte.gz" ]; then
  exit 0
fi
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
  echo "installing Fashion-MNIST (Debian package dataset-fashion-mnist)"
  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dataset-fashion-mnist) \
    >/tmp/mimar-apt.log 2>&1 || echo "could not install dataset-fashion-mnist (see /tmp/mimar-apt.log)"
else
  echo "Fashion-MNIST not found in $DIR. Get it with: sudo apt-get install dataset-fashion-mnist"
  echo "or point the recipe at a folder holding the idx .gz files: data.root=/path"
  echo "(or let torchvision download it: data.download=true data.root=/path)"
fi
exit 0
