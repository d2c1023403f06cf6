#!/usr/bin/env bash
# Trains the bundles shipped in weights/ with the recipes their cards record.
#
#   scripts/train-shipped.sh DATASETS_DIR [polyp|nuclei|nuclei-v2|membrane ...]
#
# DATASETS_DIR holds kvasir_seg/, dsb2018_nuclei/ and isbi2012_em_membrane/ (images/ + masks/ each;
# dsb2018_nuclei/ also instances/, which nuclei-v2 trains on).
# Runs go to $RUNS (default runs/); an interrupted run continues where it stopped when started again.
# `polyp-1.1` re-creates polyp 1.1.0 in two stages (the second fine-tunes the first stage's bundle with a
# fresh schedule, --init); `polyp` adds a third stage for version 2 on top of them. Each model's bundle is written to
# $RUNS/RUN/bundle (RUN = its last stage: polyp-v2, polyp-2, nuclei, nuclei-v2, membrane-v1.3): copy one into
# weights/ only when it beats the shipped one.
# Extra flags for every run (e.g. --device cuda, --threads 1) come from $TRAIN_FLAGS.
set -euo pipefail
data=${1:?usage: scripts/train-shipped.sh DATASETS_DIR [NAME ...]}
shift
runs=${RUNS:-runs}
names=("$@")
[ ${#names[@]} -gt 0 ] || names=(membrane nuclei polyp)
python=${PYTHON:-python}

# run RUN_ID NAME ARGS...: one stage, resumed when RUN_ID has a checkpoint, skipped once it has a bundle
# (written when a run ends, or by `python -m model.train --run-dir RUNS/RUN_ID --export` for a stopped one).
run() {
  local id=$1 name=$2
  shift 2
  [ -f "$runs/$id/bundle/card.json" ] && return 0
  local resume=()
  [ -f "$runs/$id/last.pt" ] && resume=(--resume)
  # shellcheck disable=SC2086
  "$python" -m model.train --name "$name" --run-dir "$runs/$id" --out "$runs/$id/bundle" "${resume[@]}" \
    "$@" ${TRAIN_FLAGS:-}
}

for name in "${names[@]}"; do
  case $name in
    polyp | polyp-1.1)
      common=(--data "$data/kvasir_seg" --mask binary:127 --classes background,polyp --colors 000000,ff3b30
        --sizing resize --base-width 24 --batch-size 8 --patience 0
        --description "Colorectal polyps in colonoscopy frames (binary)."
        --dataset-name "Kvasir-SEG" --dataset-url "https://datasets.simula.no/kvasir-seg/"
        --dataset-license "research and educational use; commercial use needs the authors' permission (the images also ship in HyperKvasir under CC BY 4.0)"
        --dataset-citation "Jha et al., Kvasir-SEG: A Segmented Polyp Dataset, MMM 2020")
      # Version 1.1.0, two stages at 224 px. The shipped stage 1 was stopped after 27 of its 36 epochs
      # and exported with --export; stage 2 was stopped after 49 of its 56 epochs and exported likewise.
      # weights/polyp 1.1.0 is stage 2's bundle: copying it to $RUNS/polyp-2/bundle skips both stages.
      [ -f "$runs/polyp-2/bundle/card.json" ] || run polyp polyp "${common[@]}" --size 224 --epochs 36 --lr 2e-3
      run polyp-2 polyp "${common[@]}" --size 224 --epochs 56 --lr 1e-3 --warmup-epochs 1 \
        --init "$runs/polyp/bundle" --version 1.1.0
      if [ "$name" = polyp ]; then
        # Version 2: 1.1.0 fine-tuned at 352 px (the resolution strong Kvasir-SEG results train and test
        # at) with heavy geometric and colour augmentation (zoom 0.5-1.5, any rotation, shear, brightness,
        # contrast and saturation) and deep supervision of the coarser decoder levels, on the same
        # training split (same seed and validation fraction), with a fresh schedule.
        run polyp-v2 polyp "${common[@]}" --size 352 --epochs 16 --lr 1e-3 --warmup-epochs 1 --scale 0.5,1.5 \
          --rotate 180 --shear 22 --brightness 0.3 --contrast 0.3 --saturation 0.3 --deep-supervision 0.5 \
          --init "$runs/polyp-2/bundle" --version 2.0.0
      fi ;;
    polyp-v3)
      # Version 3: a U-Net on an ImageNet-pretrained EfficientNet-Lite0 encoder (the train extra's weights,
      # their normalisation), trained from those weights on the same split (seed 0, validation 10%) at
      # 352 px with polyp 2's augmentation and deep supervision; the encoder learns at a tenth of the
      # decoder's rate; the exported weights are a moving average (with its warm-up).
      run polyp-v3 polyp --data "$data/kvasir_seg" --mask binary:127 --classes background,polyp --colors 000000,ff3b30 \
        --sizing resize --size 352 --encoder efficientnet-lite0 --pretrained --encoder-lr 0.1 --base-width 16 \
        --batch-size 8 --epochs 22 --lr 1e-3 --warmup-epochs 1 --ema 0.99 --patience 0 --scale 0.5,1.5 \
        --rotate 180 --shear 22 --brightness 0.3 --contrast 0.3 --saturation 0.3 --deep-supervision 0.5 \
        --version 3.0.0 --description "Colorectal polyps in colonoscopy frames (binary)." \
        --dataset-name "Kvasir-SEG" --dataset-url "https://datasets.simula.no/kvasir-seg/" \
        --dataset-license "research and educational use; commercial use needs the authors' permission (the images also ship in HyperKvasir under CC BY 4.0)" \
        --dataset-citation "Jha et al., Kvasir-SEG: A Segmented Polyp Dataset, MMM 2020" ;;
    nuclei-v3)
      # Version 3: nuclei 2's instance recipe (interior and 2-pixel boundary classes, watershed, best epoch by
      # validation mAP) on the ImageNet-pretrained EfficientNet-Lite0 encoder, as polyp 3; 30 epochs (nuclei 2
      # trained 40 from scratch).
      run nuclei-v3 nuclei --data "$data/dsb2018_nuclei" --mask instances:boundary=2 \
        --classes background,nucleus,boundary --colors 000000,34c759,ffd60a --min-area 16 \
        --sizing tile --size 256 --encoder efficientnet-lite0 --pretrained --encoder-lr 0.1 --base-width 16 \
        --epochs 30 --steps-per-epoch 50 --batch-size 8 --lr 2e-3 --warmup-epochs 1 --ema 0.99 --patience 0 \
        --version 3.0.0 \
        --description "Cell nuclei in fluorescence, brightfield and H&E microscopy, one instance per nucleus (interior and boundary classes, split by watershed)." \
        --dataset-name "2018 Data Science Bowl stage1_train (BBBC038) with community mask fixes" \
        --dataset-url "https://bbbc.broadinstitute.org/BBBC038" --dataset-license "CC0 1.0" \
        --dataset-citation "Caicedo et al., Nucleus segmentation across imaging experiments: the 2018 Data Science Bowl, Nature Methods 16, 2019" ;;
    nuclei)
      run nuclei nuclei --data "$data/dsb2018_nuclei" --mask binary:127 --classes background,nucleus --colors 000000,34c759 \
        --sizing tile --size 256 --base-width 24 --epochs 24 --steps-per-epoch 50 --batch-size 8 --lr 2e-3 --patience 0 \
        --description "Cell nuclei in fluorescence, brightfield and H&E microscopy (binary, union of instances)." \
        --dataset-name "2018 Data Science Bowl stage1_train (BBBC038) with community mask fixes" \
        --dataset-url "https://bbbc.broadinstitute.org/BBBC038" --dataset-license "CC0 1.0" \
        --dataset-citation "Caicedo et al., Nucleus segmentation across imaging experiments: the 2018 Data Science Bowl, Nature Methods 16, 2019" ;;
    nuclei-v2)
      # Version 2.0.0, instances: the 1.0 tiles, width, batch and learning rate, trained on the instance ids
      # as three classes (background, nucleus interior, a 2-pixel boundary inside every nucleus where it
      # meets the background or another nucleus), split into nuclei by watershed from the interiors. The
      # best epoch is the one with the highest validation mAP (2018 DSB metric). Longer than 1.0 (40
      # epochs against 24: the thin boundary class is slower to learn than the union) with a moving average
      # of the weights (--ema 0.99, as the membranes, thin structures too). --min-area 16 drops specks
      # below the smallest annotated nucleus (21 pixels).
      run nuclei-v2 nuclei --data "$data/dsb2018_nuclei" --mask instances:boundary=2 \
        --classes background,nucleus,boundary --colors 000000,34c759,ffd60a --min-area 16 \
        --sizing tile --size 256 --base-width 24 --epochs 40 --steps-per-epoch 50 --batch-size 8 --lr 2e-3 \
        --ema 0.99 --patience 0 --version 2.0.0 \
        --description "Cell nuclei in fluorescence, brightfield and H&E microscopy, one instance per nucleus (interior and boundary classes, split by watershed)." \
        --dataset-name "2018 Data Science Bowl stage1_train (BBBC038) with community mask fixes" \
        --dataset-url "https://bbbc.broadinstitute.org/BBBC038" --dataset-license "CC0 1.0" \
        --dataset-citation "Caicedo et al., Nucleus segmentation across imaging experiments: the 2018 Data Science Bowl, Nature Methods 16, 2019" ;;
    membrane)
      common=(--data "$data/isbi2012_em_membrane" --mask binary-inverted:127 --classes background,membrane
        --colors 000000,0a84ff --channels 1 --sizing tile --size 256 --base-width 32 --steps-per-epoch 25
        --batch-size 8 --val-fraction 0.2 --patience 0
        --description "Neuronal membranes in serial-section electron microscopy (class 1 = membrane)."
        --dataset-name "ISBI 2012 EM segmentation challenge, training slices"
        --dataset-url "https://imagej.net/events/isbi-2012-segmentation-challenge"
        --dataset-license "non-commercial use in segmentation software only"
        --dataset-citation "Cardona et al., An integrated micro- and macroarchitectural analysis of the Drosophila brain by computer-assisted serial section electron microscopy, PLoS Biology 2010")
      # Version 1.3.0: wider than the others, elastic deformation instead of zoom (membranes keep their
      # width in pixels), crops placed against the image border with probability 0.5 per axis (uniform
      # crops rarely cover its outer frame), the exported weights are a moving average, and 72 epochs
      # (1.2.0 was the same recipe with 40 and still improving at its end).
      run membrane-v1.3 membrane "${common[@]}" --epochs 72 --lr 2e-3 --scale 1,1 --elastic 8 --ema 0.99 \
        --border-crops 0.5 --version 1.3.0 ;;
    *) echo "unknown model $name" >&2; exit 2 ;;
  esac
done
