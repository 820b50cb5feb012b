#!/bin/sh
# Copy the pinned libraries' browser files and licences from node_modules/ (made by
# `npm ci` here) into ../static/vendor/, which the Python package ships. The files are copied
# byte for byte; source maps are left out (the console must stay small and offline).
set -eu
here=$(cd "$(dirname "$0")" && pwd)
src="$here/node_modules"
dest="$here/../static/vendor"
[ -d "$src/leaflet/dist" ] && [ -d "$src/hls.js/dist" ] || {
    echo "copy.sh: run 'npm ci' in $here first" >&2
    exit 2
}
rm -rf "$dest/leaflet" "$dest/hls"
mkdir -p "$dest/leaflet/images" "$dest/hls"
cp "$src/leaflet/dist/leaflet.js" "$src/leaflet/dist/leaflet.css" "$src/leaflet/LICENSE" \
   "$dest/leaflet/"
cp "$src/leaflet/dist/images/"*.png "$dest/leaflet/images/"
# hls.worker.js: the page runs hls.js's transmuxer in a worker loaded from this same-origin
# file (config workerPath), because the console's CSP forbids the blob: worker hls.js makes
# by default.
cp "$src/hls.js/dist/hls.min.js" "$src/hls.js/dist/hls.worker.js" "$src/hls.js/LICENSE" \
   "$dest/hls/"
node -e '
for (const p of ["leaflet", "hls.js"]) {
  const v = require(process.argv[1] + "/" + p + "/package.json").version;
  console.log(p + " " + v);
}' "$src" > "$dest/VERSIONS"
echo "copied into $dest:"
cat "$dest/VERSIONS"
