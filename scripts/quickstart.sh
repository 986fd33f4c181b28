#!/usr/bin/env bash
# Build a database from a folder and search it, offline, in about a minute on 2 CPU cores.
# The images are toy art drawn on the spot; the CLIP is a tiny random open_clip model in local-dir
# format (real users pass --clip ViT-L-14:openai or their own), so this shows the mechanics:
# folder -> embeddings -> FAISS -> search -> contact sheet.
set -euo pipefail
OUT=${1:-outputs/quickstart}
rm -rf "$OUT" && mkdir -p "$OUT"
rdm toyart "$OUT/catalog" -n 120 --styles flat,neon,mosaic
python -c "from rdm.models.tiny import make_tiny_clip; make_tiny_clip('$OUT/tiny_clip')"
rdm build-index "$OUT/catalog" --name quickstart --clip "local-dir:$OUT/tiny_clip" --indexes "$OUT/indexes"
rdm --indexes "$OUT/indexes" info quickstart
first=$(ls "$OUT/catalog/neon" | head -1)
rdm --indexes "$OUT/indexes" search --db quickstart --image "$OUT/catalog/neon/$first" -k 8 \
    --sheet "$OUT/search_sheet.png"
rdm --indexes "$OUT/indexes" search --db quickstart --image "$OUT/catalog/neon/$first" -k 4 --where style=flat
echo "contact sheet: $OUT/search_sheet.png"
