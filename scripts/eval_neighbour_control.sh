#!/usr/bin/env bash
# Control over the neighbours, measured on the demo model with rdm score (and the toy-art judge for content):
#   diversity   -> the neighbours' mean pairwise cosine and the style swap (rdm score --model ... --diversity D)
#   negatives   -> the probe's probability of the avoided style in samples of a mixed collection (rdm sample
#                  --negative-db, then rdm score on the PNGs)
#   content     -> the judge's content accuracy (shape and colour) and style swap at --content-subtract L
#
#   IDX=runs/eval/idx JUDGE=runs/eval/judge OUT=runs/eval/neighbour-control bash scripts/eval_neighbour_control.sh
#
# IDX holds per-style databases of unseen toy art (python scripts/eval_style_swap.py databases ... --template
# 'large-{style}' and 'small-{style}'; 'mono-{style}' with --n-per-style 64 --start 74000000 --shapes circle
# --colours red) and mix-neon-outline (neon and outline toy art in one folder, rdm build-index);
# JUDGE is the toy-art judge (python scripts/eval_style_swap.py classifier --out JUDGE).
set -euo pipefail
MODEL=${MODEL:-$(python -c 'from rdm.demo.run import DEMO_MODEL; print(DEMO_MODEL)')}
IDX=${IDX:?set IDX to the databases home}
JUDGE=${JUDGE:?set JUDGE to the toy-art judge folder}
OUT=${OUT:-runs/eval/neighbour-control}
STYLES="flat outline mosaic dotted striped neon"
mkdir -p "$OUT"
large=(); small=()
for s in $STYLES; do large+=(--db "large-$s"); small+=(--db "small-$s"); done
prompts=(--prompt "a purple hexagon" --prompt "an orange diamond" --prompt "a green cross" --prompt "a blue heart")

# 1. diversity: the same prompts and seeds against each large database
for d in 0 0.5 0.8; do
    rdm --indexes "$IDX" score --model "$MODEL" "${large[@]}" "${prompts[@]}" --seeds 31,32 --diversity "$d" \
        --json > "$OUT/diversity-$d.json"
done

# 2. a negative collection: samples of the neon + outline collection, with and without --negative-db small-neon
for mode in off on; do
    extra=(); [ "$mode" = on ] && extra=(--negative-db small-neon)
    rm -rf "$OUT/negative-$mode"
    for p in "a red star" "a yellow circle" "a pink square" "a cyan triangle" "a green heart" "a blue cross"; do
        rdm --indexes "$IDX" sample "$p" --model "$MODEL" --db mix-neon-outline -n 2 --seed 41 --quiet \
            --out "$OUT/negative-$mode" "${extra[@]}" > /dev/null
    done
    rm -f "$OUT/negative-$mode"/*grid*.png
    rdm --indexes "$IDX" score "$OUT/negative-$mode" "${small[@]}" --json > "$OUT/negative-$mode.json"
done

# 3. content kept out of the style: the judge's content accuracy and style swap, with databases whose items show
#    every content (large-{style}) and with one-content collections (mono-{style}: only red circles, where the
#    neighbours' content differs from almost every prompt's)
for db in large mono; do
    for l in 0 0.5 1; do
        python scripts/eval_style_swap.py evaluate --model "$MODEL" --databases "$db-{style}" --classifier "$JUDGE" \
            --indexes "$IDX" --contents 16 --content-offset 32 --seeds 77 --content-subtract "$l" --no-score \
            --no-control --out "$OUT/content-$db-$l.json" > /dev/null
    done
done

python - "$OUT" <<'EOF'
import json, sys
from pathlib import Path

out = Path(sys.argv[1])
print("| diversity | neighbours' mean pairwise cosine | style-swap (probe) | retrieval precision |")
print("|---:|---:|---:|---:|")
for d in ("0", "0.5", "0.8"):
    (cell,) = json.loads((out / f"diversity-{d}.json").read_text())["cells"]
    print(f"| {d} | {cell['neighbour_cosine']:.3f} | {100 * cell['probe_accuracy']:.1f}% | "
          f"{cell['retrieval_precision']:.3f} |")
print()
print("| samples of neon + outline | probe P(neon) | probe P(outline) | probe picks neon |")
print("|---|---:|---:|---:|")
for mode, label in (("off", "as retrieved"), ("on", "--negative-db small-neon")):
    r = json.loads((out / f"negative-{mode}.json").read_text())
    picks = sum(i["probe_pick"] == "small-neon" for i in r["images"]) / len(r["images"])
    print(f"| {label} | {r['summary']['probe']['small-neon']:.3f} | {r['summary']['probe']['small-outline']:.3f} | "
          f"{100 * picks:.1f}% |")
print()
print("| databases | --content-subtract | judge: content (shape and colour) | judge: style-swap | nearest centroid |")
print("|---|---:|---:|---:|---:|")
for db in ("large", "mono"):
    for l in ("0", "0.5", "1"):
        o = json.loads((out / f"content-{db}-{l}.json").read_text())["summary"]
        print(f"| {db}-{{style}} | {l} | {100 * o['content_accuracy']:.1f}% | {100 * o['style_swap_accuracy']:.1f}% | "
              f"{100 * o.get('centroid_accuracy', float('nan')):.1f}% |")
EOF
