#!/bin/sh
# Run every file in /entrypoint-initdb.d (sorted), then exposrd with the
# container arguments: the original image's contract.
set -e
if [ -d /entrypoint-initdb.d ]; then
    for f in $(ls /entrypoint-initdb.d | sort); do
        echo "entrypoint: running /entrypoint-initdb.d/$f"
        "/entrypoint-initdb.d/$f"
    done
fi
exec exposrd "$@"
