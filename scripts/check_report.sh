#!/usr/bin/env bash
# Render a polyfuse report.html in headless Chromium, save a screenshot of the whole page and check
# that it is not blank (text and the embedded figures drew).
#
#   scripts/check_report.sh REPORT_HTML OUT_PNG [WIDTH]
#
# Exit codes: 0 ok, 1 blank or failed render, 3 no browser (install one with `make assets`, which
# runs `apt-get install chromium` as root). The browser is taken from $BROWSER, else the first of
# chromium, chromium-browser, google-chrome, google-chrome-stable on PATH.
set -euo pipefail

if [ $# -lt 2 ]; then
  echo "usage: $0 REPORT_HTML OUT_PNG [WIDTH]" >&2
  exit 2
fi
html=$1
png=$2
width=${3:-1200}
py=${PYTHON:-$(dirname "$0")/../.venv/bin/python}
[ -x "$py" ] || py=python3

browser=${BROWSER:-}
if [ -z "$browser" ]; then
  for name in chromium chromium-browser google-chrome google-chrome-stable; do
    if command -v "$name" >/dev/null 2>&1; then browser=$(command -v "$name"); break; fi
  done
fi
if [ -z "$browser" ]; then
  echo "no headless Chromium found (chromium, chromium-browser, google-chrome); run: make assets" >&2
  exit 3
fi
[ -f "$html" ] || { echo "$html: no such file; write it with: polyfuse report RUN_DIR" >&2; exit 1; }

tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
url="file://$(cd "$(dirname "$html")" && pwd)/$(basename "$html")"

# Headless screenshots cover the window only: render into a tall window, then crop the blank bottom.
for height in 6000 16000; do
  timeout 120 "$browser" --headless --no-sandbox --disable-gpu --hide-scrollbars --no-first-run \
    --user-data-dir="$tmp/profile" --window-size="$width,$height" --screenshot="$tmp/full.png" "$url" \
    >"$tmp/browser.log" 2>&1 || { cat "$tmp/browser.log" >&2; exit 1; }
  if "$py" - "$tmp/full.png" "$png" <<'PY'
import sys

from PIL import Image, ImageChops

full, out = sys.argv[1], sys.argv[2]
image = Image.open(full).convert("RGB")
box = ImageChops.difference(image, Image.new("RGB", image.size, "white")).getbbox()
if box is None:
    sys.exit("blank screenshot: nothing drew")
if box[3] >= image.size[1] - 2:
    sys.exit(10)  # content reaches the bottom edge: render taller
page = image.crop((0, 0, image.size[0], box[3] + 32))
pixels = page.width * page.height
inked = sum(count for count, rgb in page.getcolors(pixels) if sum(rgb) < 3 * 230)
colours = sum(1 for _, (r, g, b) in page.getcolors(pixels) if max(r, g, b) - min(r, g, b) > 60)
if inked < 0.01 * pixels or colours < 20:
    sys.exit(f"screenshot looks blank: {inked / pixels:.2%} inked pixels, {colours} distinct colours")
page.save(out, optimize=True)
print(f"{out}: {page.width}x{page.height}, {inked / pixels:.1%} inked pixels, {colours} colours")
PY
  then exit 0
  else
    rc=$?
    [ "$rc" = 10 ] || exit 1
  fi
done
echo "the report is taller than 16000 px; the screenshot was cut" >&2
exit 1
