#!/usr/bin/env bash
# Builds the image docker/run.sh runs, from the repository root whatever the current folder:
#   docker/build.sh                      # docker build -f docker/Dockerfile -t resnet-imagenet:latest .
#   docker/build.sh --no-cache           # extra arguments go to `docker build`
# RESNET_IMAGE names it (default resnet-imagenet:latest). The commit, with +dirty when tracked files differ from
# it, becomes the image's org.opencontainers.image.revision label (the container has no .git).
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
image=${RESNET_IMAGE:-resnet-imagenet:latest}
commit=$(git rev-parse HEAD 2>/dev/null || echo unknown)
if [[ $commit != unknown && -n $(git status --porcelain --untracked-files=no) ]]; then
    commit+=+dirty
fi

exec docker build -f docker/Dockerfile -t "$image" --build-arg GIT_COMMIT="$commit" "$@" .
