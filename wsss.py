"""wsss.py: a single-file reference implementation of CLIP-based single-stage weakly supervised
semantic segmentation (WSSS): image-level labels -> frozen CLIP -> class activation maps (CAMs) ->
affinity refinement -> pixel pseudo-labels -> a light trained decoder.

Methods (`--method` is the one dial; each preset is a few Config overrides, see METHODS):
  weclip  WeCLIP, "Frozen CLIP: A Strong Backbone for Weakly Supervised Semantic Segmentation",
          Zhang et al., CVPR 2024, arXiv:2406.11189. GradCAM CAMs on frozen CLIP, attention-affinity
          refinement (RFM), pixel-adaptive refinement (PAR), a 3-block transformer decoder.
  cdclip  CD-CLIP, "Leveraging Class Distributions in CLIP for Weakly Supervised Semantic Segmentation",
          CVPR 2026 (no public code; every inferred choice is a Config field, tagged [I] below).
          Class-distribution-aware affinity (CDA, Jensen-Shannon divergence between the patches'
          distributions over all class texts) and super-class boundary exploration (SBE, DINOv2 prototypes
          supervising a gated Dice loss).

Run (CPU is fine for the demo; a CUDA GPU is used automatically when present):
  python wsss.py train --method cdclip --demo          # synthetic world, toy CLIP, ~1.5 min on 2 CPU cores
  python wsss.py train --method cdclip --data-root VOCdevkit/VOC2012   # real VOC, real checkpoints (GPU)
  python wsss.py eval  --method cdclip --data-root ... --ckpt runs/cdclip-voc/ckpt.pt [--crf] [--save-vis DIR]
  python wsss.py cams  --method cdclip --data-root ... --refine cda   # training-free pseudo-label mIoU
  python wsss.py synth --data-root /tmp/synth          # write the synthetic dataset in the VOC layout
  python wsss.py pretrain-toy                          # contrastively pre-train the toy CLIP used by --demo
  python wsss.py bench --method cdclip --clip-pretrained random --dino-model random  # timings of a step
  torchrun --nproc_per_node=4 wsss.py train ...        # DDP (nccl on GPU, gloo on CPU)
  pytest test_wsss.py                                  # the test-suite (CPU, tiny models, ~70 s)

Notation used in shape comments: B batch, R rows of a batched GradCAM (one per (image, class) pair),
K classes incl. background, C foreground classes, T texts, D feature width, E joint embedding width,
h,w patch grid, N = h*w patches, H,W image, L CLIP blocks.

Faithfulness: numerics follow the official WeCLIP code where it produced the published numbers;
`[code≠paper]` marks where that code (for CD-CLIP, ours) departs from the paper, `[upstream bug fixed]` where we
fixed a bug of the official code, and `[I]` a CD-CLIP choice inferred because the paper does not give it.

Not included: ExCEL and DiCLIP (planned, not started); WeCLIP+ (DINO decoder branch); fp16 CLIP weights as
in the official code (we run CLIP and the whole label path in fp32, also under --amp); upstream's fp16 cast of
the decoder's attention (ours runs in fp32, or in autocast's dtype under --amp); multi-node launch scripts;
wandb/TensorBoard logging (metrics go to a JSON-lines file).
"""
from __future__ import annotations

import argparse
import dataclasses
import hashlib
import importlib
import json
import math
import os
import random
import re
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass, fields
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F


class WSSSError(Exception):
    """A user-facing error: main() prints its message as one line and exits with status 2."""


# ----------------------------------------------------------------------------------------------------
# Config: datasets table, method presets, one dataclass (the CLI is generated from its fields)
# ----------------------------------------------------------------------------------------------------

IGNORE = 255  # void / ignore label in every mask and pseudo-label

VOC_CLASSES = ["background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair",
               "cow", "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa",
               "train", "tvmonitor"]
# WeCLIP's prompt synonyms (clip_text.py `new_class_names`), VOC ids 1..20.
VOC_PROMPTS = ["aeroplane", "bicycle", "bird avian", "boat", "bottle", "bus", "car", "cat", "chair seat", "cow",
               "diningtable", "dog", "horse", "motorbike", "person with clothes,people,human", "pottedplant",
               "sheep", "sofa", "train", "tvmonitor screen"]
VOC_BG = ["ground", "land", "grass", "tree", "building", "wall", "sky", "lake", "water", "river", "sea", "railway",
          "railroad", "keyboard", "helmet", "cloud", "house", "mountain", "ocean", "road", "rock", "street",
          "valley", "bridge", "sign"]
COCO_CLASSES = ["background", "person", "bicycle", "car", "motorbike", "aeroplane", "bus", "train", "truck", "boat",
                "traffic light", "fire hydrant", "stop sign", "parking meter", "bench", "bird", "cat", "dog",
                "horse", "sheep", "cow", "elephant", "bear", "zebra", "giraffe", "backpack", "umbrella",
                "handbag", "tie", "suitcase", "frisbee", "skis", "snowboard", "sports ball", "kite",
                "baseball bat", "baseball glove", "skateboard", "surfboard", "tennis racket", "bottle",
                "wine glass", "cup", "fork", "knife", "spoon", "bowl", "banana", "apple", "sandwich", "orange",
                "broccoli", "carrot", "hot dog", "pizza", "donut", "cake", "chair", "sofa", "pottedplant", "bed",
                "diningtable", "toilet", "tvmonitor", "laptop", "mouse", "remote", "keyboard", "cell phone",
                "microwave", "oven", "toaster", "sink", "refrigerator", "book", "clock", "vase", "scissors",
                "teddy bear", "hair drier", "toothbrush"]
# WeCLIP's 13 COCO replacements (clip_text.py `new_class_names_coco`); "sknowboard" is upstream's spelling.
_COCO_SYNONYMS = {"person": "person with clothes,people,human", "bird": "bird avian", "backpack": "backpack,bag",
                  "umbrella": "umbrella,parasol", "handbag": "handbag,purse", "tie": "necktie",
                  "snowboard": "sknowboard", "baseball glove": "glove", "spoon": "dessertspoon",
                  "chair": "chair seat", "tvmonitor": "tvmonitor screen", "remote": "remote control",
                  "hair drier": "hairdrier,blowdrier"}
COCO_PROMPTS = [_COCO_SYNONYMS.get(c, c) for c in COCO_CLASSES[1:]]
COCO_BG = [w for w in VOC_BG if w not in ("keyboard", "sign")]  # WeCLIP's 23 COCO background words

# The synthetic world (see `draw_toy_scene`): six shapes, each in its own colour, on a noisy background.
TOY_SHAPES = [("red", "circle"), ("blue", "square"), ("green", "triangle"), ("yellow", "star"),
              ("purple", "ring"), ("orange", "cross")]
TOY_RGB = {"red": (220, 40, 40), "blue": (40, 70, 220), "green": (40, 180, 60), "yellow": (235, 215, 40),
           "purple": (150, 50, 190), "orange": (245, 140, 30)}
SYNTH_CLASSES = ["background"] + [f"{c} {s}" for c, s in TOY_SHAPES]

# Super-classes (CD-CLIP §4.1, a PROPOSAL [P]: the paper reports 5 VOC groups best, 4 too coarse, 7 misaligned,
# without listing them). Each table maps a super-class prompt word to its member class names.
VOC_SUPER = {
    4: {"person": ["person"], "animal": ["bird", "cat", "cow", "dog", "horse", "sheep"],
        "vehicle": ["aeroplane", "bicycle", "boat", "bus", "car", "motorbike", "train"],
        "indoor object": ["bottle", "chair", "diningtable", "pottedplant", "sofa", "tvmonitor"]},
    5: {"person": ["person"], "animal": ["bird", "cat", "cow", "dog", "horse", "sheep"],
        "vehicle": ["aeroplane", "bicycle", "boat", "bus", "car", "motorbike", "train"],
        "furniture": ["chair", "diningtable", "sofa"],
        "household object": ["bottle", "pottedplant", "tvmonitor"]},
    7: {"person": ["person"], "pet": ["cat", "dog"], "farm and wild animal": ["bird", "cow", "horse", "sheep"],
        "two-wheeler": ["bicycle", "motorbike"], "vehicle": ["aeroplane", "boat", "bus", "car", "train"],
        "furniture": ["chair", "diningtable", "sofa"], "household object": ["bottle", "pottedplant", "tvmonitor"]},
}
COCO_SUPER = {12: {  # the 12 official COCO supercategories, WeCLIP's VOC-style names
    "person": ["person"],
    "vehicle": ["bicycle", "car", "motorbike", "aeroplane", "bus", "train", "truck", "boat"],
    "street object": ["traffic light", "fire hydrant", "stop sign", "parking meter", "bench"],
    "animal": ["bird", "cat", "dog", "horse", "sheep", "cow", "elephant", "bear", "zebra", "giraffe"],
    "personal accessory": ["backpack", "umbrella", "handbag", "tie", "suitcase"],
    "sports equipment": ["frisbee", "skis", "snowboard", "sports ball", "kite", "baseball bat", "baseball glove",
                         "skateboard", "surfboard", "tennis racket"],
    "kitchenware": ["bottle", "wine glass", "cup", "fork", "knife", "spoon", "bowl"],
    "food": ["banana", "apple", "sandwich", "orange", "broccoli", "carrot", "hot dog", "pizza", "donut", "cake"],
    "furniture": ["chair", "sofa", "pottedplant", "bed", "diningtable", "toilet"],
    "electronic device": ["tvmonitor", "laptop", "mouse", "remote", "keyboard", "cell phone"],
    "kitchen appliance": ["microwave", "oven", "toaster", "sink", "refrigerator"],
    "household item": ["book", "clock", "vase", "scissors", "teddy bear", "hair drier", "toothbrush"]}}
SYNTH_SUPER = {3: {"round shape": ["red circle", "purple ring"], "polygon": ["blue square", "green triangle"],
                   "spiky shape": ["yellow star", "orange cross"]}}

DATASETS = {
    "voc": dict(classes=VOC_CLASSES, prompts=VOC_PROMPTS, bg_prompts=VOC_BG, superclasses=VOC_SUPER,
                mask_strip="", defaults=dict(train_split="train_aug", val_split="val", superclasses=5)),
    "coco": dict(classes=COCO_CLASSES, prompts=COCO_PROMPTS, bg_prompts=COCO_BG, superclasses=COCO_SUPER,
                 # COCO in VOC-style layout: list entries "train/COCO_train2014_<id>", masks "train/<id>.png"
                 mask_strip=r"COCO_(?:train|val)2014_",
                 defaults=dict(train_split="train", val_split="val", max_steps=80000, superclasses=12,
                               box_threshold=0.7, rfm_dynamic_after=40000, rfm_dynamic_layers=10, eval_every=0)),
    "synthetic": dict(classes=SYNTH_CLASSES, prompts=SYNTH_CLASSES[1:],
                      bg_prompts=["grey noise", "texture", "empty background", "grain", "speckles"],
                      superclasses=SYNTH_SUPER, mask_strip="",
                      defaults=dict(train_split="train", val_split="val", superclasses=3, crop_size=64,
                                    eval_long_side=64)),
}

METHODS = {
    # WeCLIP: GradCAM -> RFM (static, then dynamic with the decoder affinity) -> PAR; L = L_seg + 0.1 L_aff.
    "weclip": dict(refine="rfm", lambda_aff=0.1, lambda_b=0.0, eval_scales=(1.0, 0.75)),
    # CD-CLIP: GradCAM -> CDA (no box, no RFM: Table 3 row #3) -> PAR; L = L_seg + 0.6 L_b (SBE, gated).
    "cdclip": dict(refine="cda", lambda_aff=0.0, lambda_b=0.6, sbe_gate="ge2", eval_scales=(1.0, 1.5)),
}
REFINE_MODES = ("none", "caa", "rfm", "cda", "cda+caa", "cda+rfm")

# --demo: the synthetic world, the toy CLIP (pre-trained on first use), a short schedule.
DEMO = dict(dataset="synthetic", tiny=True, max_steps=300, batch_size=8, eval_every=0, log_every=50,
            warmup_steps=20, rfm_dynamic_after=150, num_workers=0, demo_images=240,
            cam_logit_scale=0.0)  # the toy CLIP's learned temperature (~15), not OpenAI CLIP's 100


@dataclass
class Config:
    # --- run ---
    method: str = "weclip"        # one of METHODS
    dataset: str = "voc"          # one of DATASETS
    data_root: str = ""           # dataset folder in the VOC layout (see data.md); env WSSS_DATA_ROOT
    train_split: str = "train_aug"  # split list for training (dataset preset)
    val_split: str = "val"        # split list for evaluation
    out_dir: str = ""             # run folder; derived: runs/<method>-<dataset>
    cache_dir: str = ""           # caches (labels, synthetic data, toy CLIP); derived: env WSSS_CACHE or ~/.cache/wsss
    demo: bool = False            # synthetic world + toy CLIP + short schedule (see DEMO)
    demo_images: int = 240        # images in the demo's synthetic train split (val gets a quarter)
    tiny: bool = False            # tiny models of the same library classes (toy architecture, random weights)
    seed: int = 1                 # seeds python, numpy and torch (WeCLIP setup_seed(1))
    device: str = "auto"          # auto | cpu | cuda | cuda:N
    amp: str = "auto"             # auto (bf16 if supported on CUDA, else fp16) | bf16 | fp16 | off; CPU: off
    num_workers: int = 2          # DataLoader workers (WeCLIP: 10)
    # --- frozen backbones ---
    clip_model: str = "ViT-B-16"  # open_clip architecture name
    clip_pretrained: str = "openai"  # open_clip tag, a local checkpoint path, or "random"
    dino_model: str = "facebook/dinov2-base"  # transformers id, a local folder, or "random" (CD-CLIP's ViT-B/14)
    template: str = "a clean origami {}."  # WeCLIP's prompt: "clean" in its code, "clear" in the paper [code≠paper]
    # --- data ---
    crop_size: int = 320          # training crop (WeCLIP 320 -> 20x20 tokens)
    scale_min: float = 0.5        # random rescale range (WeCLIP U(0.5, 2.0))
    scale_max: float = 2.0        # upper end of the random rescale range
    norm: str = "imagenet"        # pixel statistics fed to CLIP: imagenet (official code [code≠paper]) | clip
    # --- CAMs (WeCLIP §3) ---
    cam_logit_scale: float = 100.0  # GradCAM target softmax scale (OpenAI CLIP's exp(logit_scale)); 0: the model's own
    bg_pow: float = 1.0           # background score (1 - max_c CAM)^bg_pow (WeCLIP cam_bg_thres = 1)
    # --- refinement ---
    refine: str = "rfm"           # none | caa | rfm | cda | cda+caa | cda+rfm (CD-CLIP Table 3 rows)
    attn_layers: int = 8          # static affinity: mean attention of the last n blocks (WeCLIP 8)
    rfm_dynamic_layers: int = 6   # dynamic RFM: candidate blocks, the last n (VOC 6, COCO 10)
    rfm_dynamic_after: int = 15000  # dynamic RFM from this training step on ([upstream bug fixed]: counts steps)
    power: int = 2                # t: refined CAM = A^t m (WeCLIP squares the transition matrix)
    box_threshold: float = 0.4    # box mask threshold theta (VOC 0.4, COCO 0.7)
    box_exclusive_edge: bool = False  # reproduce upstream's box quirk (last token row/col never boxed)
    # --- CDA (CD-CLIP §3) ---
    cda_tau: float = 0.002        # tau in W = softmax(-D_JS / tau) [I]
    cda_minmax: str = "patch"     # min-max of S_a per text over patches (patch) or per patch over texts (text) [I]
    cda_bg_texts: bool = False    # add background words to T_all (an ablation [I])
    # --- PAR (WeCLIP PAR.py) ---
    par_iters: int = 20           # PAR propagation iterations
    par_dilations: tuple = (1, 2, 4, 8, 12, 24)  # PAR neighbourhood dilations (8 neighbours each)
    par_w1: float = 0.3           # image-term temperature
    par_w2: float = 0.01          # weight of the positional term (weights sum to 1 + w2, as upstream)
    # --- SBE (CD-CLIP §4) ---
    superclasses: int = 5         # which super-class table (VOC 4|5|7, COCO 12, synthetic 3)
    sbe_refine: bool = False      # also refine the super-class CAMs with the method's A^t before CAP [I]
    cap_threshold: float = 0.5    # theta_cap: CAP keeps super-class CAM values >= this [I]
    cp_area_floor: float = 0.001  # a class is "predicted" if it covers >= this fraction of pixels [I]
    sbe_gate: str = "ge2"         # apply L_b when |C_p| >= 2 (ge2), == 1 (eq1), always (all), never (off)
    lambda_b: float = 0.0         # weight of the boundary Dice loss L_b (CD-CLIP 0.6)
    # --- decoder (WeCLIP §6) ---
    dec_dim: int = 256            # decoder width (fuse MLPs and transformer)
    dec_layers: int = 3           # decoder transformer blocks
    dec_heads: int = 8            # decoder attention heads
    dec_mlp: int = 1024           # decoder MLP hidden width (QuickGELU)
    dec_dropout: float = 0.1      # Dropout2d after the fuse conv
    # --- losses ---
    lambda_aff: float = 0.1       # weight of the affinity loss (WeCLIP 0.1)
    aff_radius: int = 8           # affinity-label window (Chebyshev, token grid)
    # --- optimisation (WeCLIP §8) ---
    # cdclip keeps it [I]: CD-CLIP's stated 2e-5 would be 100x below the decoder lr that reproduces WeCLIP
    lr: float = 2e-3              # effective decoder lr; official 2e-4 x10 group [code≠paper on its face]; CD-CLIP 2e-5
    weight_decay: float = 0.01    # AdamW weight decay
    beta1: float = 0.9            # AdamW beta1
    beta2: float = 0.999          # AdamW beta2
    warmup_steps: int = 50        # linear warm-up steps
    warmup_ratio: float = 1e-6    # warm-up starts at lr * this
    poly_power: float = 1.0       # poly decay power after warm-up
    batch_size: int = 4           # per process (COCO too; CD-CLIP's COCO batch is 8 [code≠paper])
    max_steps: int = 30000        # training steps (VOC 30k, COCO 80k)
    # --- evaluation / logging ---
    eval_long_side: int = 512     # test images are resized so the long side is this
    eval_scales: tuple = (1.0, 0.75)  # multi-scale test (WeCLIP 1, 0.75; CD-CLIP 1, 1.5)
    eval_flip: bool = True        # average each scale with its horizontal flip
    eval_every: int = 2000        # validate every n steps (0: only at the end)
    # off by default (pydensecrf2 is an optional install), though CD-CLIP's reported numbers use it [code≠paper]
    crf: bool = False             # DenseCRF post-processing (needs pydensecrf2)
    crf_iters: int = 10           # DenseCRF mean-field iterations (WeCLIP utils/dcrf.py)
    crf_pos_xy: float = 3.0       # Gaussian kernel: spatial std (pixels)
    crf_pos_w: float = 3.0        # Gaussian kernel: compatibility weight
    crf_bi_xy: float = 64.0       # bilateral kernel: spatial std (pixels)
    crf_bi_rgb: float = 5.0       # bilateral kernel: colour std (0..255)
    crf_bi_w: float = 4.0         # bilateral kernel: compatibility weight
    log_every: int = 200          # print/log a line every n steps
    save_every: int = 2000        # checkpoint every n steps (and at the end)
    resume: str = ""              # checkpoint to continue from
    overfit_batch: bool = False   # debug: train on the first batch only (the loss should go towards 0)
    ckpt: str = ""                # checkpoint for `eval` (derived: <out_dir>/ckpt.pt)
    save_vis: str = ""            # `eval`: folder for PNG overlays
    num_vis: int = 8              # overlays written with --save-vis
    cam_split: str = "train"      # `cams`: split whose pseudo-labels are scored (the papers' "M": VOC train)
    bench_repeats: int = 3        # `bench`: timed repeats per stage (median reported, after one warm-up)
    max_images: int = 0           # evaluate / measure on at most this many images (0: all)
    # --- synthetic world / toy CLIP (for --demo) ---
    num_images: int = 200         # `synth`: number of train images (val gets a quarter)
    image_size: int = 64          # `synth`: image side
    toy_steps: int = 160          # `pretrain-toy`: contrastive steps (~45 s on 2 CPU cores)
    toy_batch: int = 128          # `pretrain-toy`: image-caption pairs per step
    toy_lr: float = 2e-3          # `pretrain-toy`: peak AdamW lr
    toy_weight_decay: float = 0.1  # `pretrain-toy`: AdamW weight decay (CLIP's)
    toy_warmup: float = 0.1       # `pretrain-toy`: fraction of the steps spent in linear warm-up, then cosine


def parse_config(argv, command: str = "train") -> Config:
    """CLI flags generated from Config's fields. Precedence: field default < dataset preset < method preset <
    --demo < explicit flags. Unknown flags and ill-typed values are errors (argparse exits with status 2)."""
    parser = build_parser(command)
    ns = parser.parse_args(argv)
    given = {k: v for k, v in vars(ns).items() if k != "command"}
    return make_config(**given)


def build_parser(command: str = "train") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=f"wsss.py {command}", argument_default=argparse.SUPPRESS)
    for f in fields(Config):
        flag = "--" + f.name.replace("_", "-")
        help_ = _FIELD_HELP.get(f.name, "")
        if f.type in ("bool", bool):
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, help=help_)
        elif f.type in ("tuple", tuple):
            parser.add_argument(flag, type=_number_list, metavar="A,B,...", help=help_)
        else:
            parser.add_argument(flag, type={"int": int, "float": float, "str": str}[f.type], help=help_)
    return parser


def _number_list(text: str) -> tuple:
    try:
        return tuple(float(t) if "." in t or "e" in t else int(t) for t in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}")


def _field_help() -> dict:
    """Each field's trailing comment becomes its --help text (one source of truth: the dataclass above)."""
    try:
        src = Path(__file__).read_text()
    except OSError:
        return {}
    body = src[src.index("class Config:"):src.index("def parse_config")]
    return {m.group(1): m.group(2).strip() for m in re.finditer(r"^\s+(\w+): \w+ = .*?#(.*)$", body, re.M)}


_FIELD_HELP = _field_help()


def make_config(**given) -> Config:
    """Resolve presets under explicit values, validate, and fill the derived fields."""
    method, dataset = given.get("method", Config.method), given.get("dataset", Config.dataset)
    if given.get("demo"):
        dataset = given.get("dataset", DEMO["dataset"])
    if method not in METHODS:
        raise WSSSError(f"unknown --method {method!r}; choose one of {', '.join(METHODS)}")
    if dataset not in DATASETS:
        raise WSSSError(f"unknown --dataset {dataset!r}; choose one of {', '.join(DATASETS)}")
    values = dict(DATASETS[dataset]["defaults"])
    values.update(METHODS[method])
    if given.get("demo"):
        values.update(DEMO)
    values.update(given)
    values.update(method=method, dataset=dataset)
    cfg = Config(**values)
    validate_config(cfg)
    # derived at runtime
    if not cfg.data_root:
        cfg.data_root = os.environ.get("WSSS_DATA_ROOT", "")
    if not cfg.cache_dir:
        cfg.cache_dir = os.environ.get("WSSS_CACHE", str(Path.home() / ".cache" / "wsss"))
    if cfg.demo and not cfg.data_root:
        cfg.data_root = str(Path(cfg.cache_dir) / f"synthetic-{cfg.demo_images}")
    if not cfg.out_dir:
        cfg.out_dir = str(Path("runs") / f"{cfg.method}-{cfg.dataset}{'-demo' if cfg.demo else ''}")
    if not cfg.ckpt:
        cfg.ckpt = str(Path(cfg.out_dir) / "ckpt.pt")
    if cfg.demo and cfg.clip_pretrained == Config.clip_pretrained:
        cfg.clip_pretrained = str(toy_clip_path(cfg))
    return cfg


def validate_config(cfg: Config):
    choices = dict(refine=REFINE_MODES, sbe_gate=("ge2", "eq1", "all", "off"), norm=("imagenet", "clip"),
                   amp=("auto", "bf16", "fp16", "off"), cda_minmax=("patch", "text"))
    for name, allowed in choices.items():
        if getattr(cfg, name) not in allowed:
            raise WSSSError(f"--{name.replace('_', '-')} {getattr(cfg, name)!r} is not one of {', '.join(allowed)}")
    supers = DATASETS[cfg.dataset]["superclasses"]
    if cfg.superclasses not in supers:
        raise WSSSError(f"--superclasses {cfg.superclasses} has no table for {cfg.dataset}; "
                        f"choose {'|'.join(map(str, supers))}")
    for name, low in (("batch_size", 1), ("crop_size", 1), ("max_steps", 1), ("attn_layers", 1),
                      ("rfm_dynamic_layers", 1), ("par_iters", 0), ("power", 0), ("toy_steps", 1)):
        if getattr(cfg, name) < low:
            raise WSSSError(f"--{name.replace('_', '-')} must be >= {low}, got {getattr(cfg, name)}")
    if not (0 < cfg.scale_min <= cfg.scale_max):
        raise WSSSError(f"need 0 < --scale-min <= --scale-max, got {cfg.scale_min}, {cfg.scale_max}")
    if cfg.cda_tau <= 0:
        raise WSSSError(f"--cda-tau must be > 0, got {cfg.cda_tau}")


# Fields that define the trained decoder: `eval` refuses a checkpoint whose values differ.
MODEL_KEYS = ("dataset", "clip_model", "tiny", "dec_dim", "dec_layers", "dec_heads", "dec_mlp")
# ... and the run: `--resume` also refuses these (max_steps may change, to extend a run).
RESUME_KEYS = MODEL_KEYS + ("method", "refine", "superclasses", "crop_size", "batch_size", "seed", "lr",
                            "lambda_aff", "lambda_b", "sbe_gate")


# ----------------------------------------------------------------------------------------------------
# Utilities: seeding, device and autocast, distributed helpers, atomic writes
# ----------------------------------------------------------------------------------------------------

def seed_everything(seed: int):
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def get_device(cfg: Config):
    if cfg.device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(cfg.device)
    except RuntimeError:
        raise WSSSError(f"--device {cfg.device!r} is not a device (auto | cpu | cuda | cuda:N)")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise WSSSError(f"--device {cfg.device} asked for, but torch sees no CUDA device here; use --device cpu")
    return device


def autocast_ctx(cfg: Config, device):
    """fp32 on CPU; bf16 (or fp16 with a GradScaler) autocast on CUDA."""
    if device.type != "cuda" or cfg.amp == "off":
        return nullcontext(), None
    dtype = torch.bfloat16 if cfg.amp == "bf16" or (cfg.amp == "auto" and torch.cuda.is_bf16_supported()) \
        else torch.float16
    return torch.autocast("cuda", dtype=dtype), dtype


def fp32(device):
    """A region that runs in float32 even inside a training autocast: the frozen encoders and the whole label
    path (CAMs, affinities, refinements, PAR). Only the trained head uses AMP."""
    return torch.autocast(torch.device(device).type, enabled=False)


def dist_info():
    """(rank, world_size, local_rank) from torchrun's environment variables."""
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("LOCAL_RANK", 0))


def print0(*args, **kw):
    if dist_info()[0] == 0:
        print(*args, **kw, flush=True)


def atomic_save(obj, path):
    """torch.save to a temp file in the same folder, then rename: a crash never leaves a half-written file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def atomic_write_text(text: str, path):
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def minmax(x, dims=(-2, -1), eps: float = 1e-7):
    """Per-map min-max to [0, 1): (x - min) / (eps + max(x - min)), as pytorch_grad_cam's scale_cam_image."""
    x = x - x.amin(dim=dims, keepdim=True)
    return x / (eps + x.amax(dim=dims, keepdim=True))


# ----------------------------------------------------------------------------------------------------
# Data: the synthetic world, one loader for the VOC folder layout (VOC, COCO in VOC layout, synthetic)
# ----------------------------------------------------------------------------------------------------

IMAGENET_MEAN, IMAGENET_STD = (123.675, 116.28, 103.53), (58.395, 57.12, 57.375)  # on 0..255 RGB
CLIP_MEAN = tuple(255 * m for m in (0.48145466, 0.4578275, 0.40821073))
CLIP_STD = tuple(255 * s for s in (0.26862954, 0.26130258, 0.27577711))
CAPTION_TEMPLATES = ["a picture of {}.", "a photo of {}.", "an image with {}.", "{} on a noisy background."]


def _shape_mask(shape: str, u, v, r: float):
    """Inside-test of one toy shape in its own rotated frame (u, v), circumradius r."""
    rho, theta = np.hypot(u, v), np.arctan2(v, u)
    if shape == "circle":
        return rho <= r
    if shape == "square":
        return (np.abs(u) <= 0.75 * r) & (np.abs(v) <= 0.75 * r)
    if shape == "triangle":  # equilateral: inside all three edges at distance r/2 from the centre
        return np.all([u * np.cos(a) + v * np.sin(a) <= r / 2 for a in np.pi / 2 + 2 * np.pi / 3 * np.arange(3)
                       + np.pi], axis=0)
    if shape == "star":  # five points; the boundary radius falls linearly from r to 0.45 r between points
        phase = np.abs(((theta + np.pi / 2) % (2 * np.pi / 5)) / (2 * np.pi / 5) - 0.5) * 2  # 1 at a point
        return rho <= r * (0.45 + 0.55 * phase)
    if shape == "ring":
        return (rho <= r) & (rho >= 0.55 * r)
    if shape == "cross":
        return ((np.abs(u) <= 0.3 * r) & (np.abs(v) <= r)) | ((np.abs(v) <= 0.3 * r) & (np.abs(u) <= r))
    raise ValueError(shape)


def draw_toy_scene(rng: np.random.Generator, size: int = 64):
    """One scene of the synthetic world: 1-3 distinct shapes in separate quadrants (with jitter, rotation and
    colour jitter) on a noisy textured background. Returns (image uint8 (H,W,3), mask uint8 (H,W) with class
    ids 0..6, sorted class ids present, caption naming exactly those classes in random order)."""
    yy, xx = np.mgrid[0:size, 0:size] + 0.5
    # background: a random grey level, a low-frequency texture and pixel noise
    freq, phase = rng.uniform(0.05, 0.3, 2), rng.uniform(0, 2 * np.pi, 2)
    texture = 18 * np.sin(freq[0] * xx + phase[0]) * np.cos(freq[1] * yy + phase[1])
    image = rng.uniform(90, 160) + texture[..., None] + rng.normal(0, 12, (size, size, 3))
    mask = np.zeros((size, size), np.uint8)
    k = int(rng.integers(1, 4))
    quadrants = rng.permutation(4)[:k]
    classes = rng.permutation(len(TOY_SHAPES))[:k] + 1
    for q, c in zip(quadrants, classes):
        r = size * rng.uniform(0.15, 0.2)
        cx = size * (0.25 + 0.5 * (q % 2)) + size * rng.uniform(-0.04, 0.04)
        cy = size * (0.25 + 0.5 * (q // 2)) + size * rng.uniform(-0.04, 0.04)
        a = rng.uniform(0, 2 * np.pi)
        u = (xx - cx) * np.cos(a) + (yy - cy) * np.sin(a)  # rotate the pixel grid into the shape's frame
        v = -(xx - cx) * np.sin(a) + (yy - cy) * np.cos(a)
        inside = _shape_mask(TOY_SHAPES[c - 1][1], u, v, r)
        colour = np.array(TOY_RGB[TOY_SHAPES[c - 1][0]]) + rng.uniform(-25, 25, 3)
        image[inside] = colour + rng.normal(0, 8, (int(inside.sum()), 3))
        mask[inside] = c
    present = sorted(int(c) for c in np.unique(mask) if c > 0)  # a shape can never vanish, but be exact
    names = [f"a {SYNTH_CLASSES[c]}" for c in rng.permutation(present)]
    listed = names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]
    caption = CAPTION_TEMPLATES[int(rng.integers(len(CAPTION_TEMPLATES)))].format(listed)
    return np.clip(image, 0, 255).astype(np.uint8), mask, present, caption


def make_synthetic_dataset(root, num_images: int = 200, image_size: int = 64, seed: int = 0) -> Path:
    """Write the synthetic world in the VOC layout: JPEGImages/*.jpg, SegmentationClass/*.png (exact masks),
    ImageSets/Segmentation/{train,val}.txt (val holds num_images // 4 further images). Deterministic in seed."""
    from PIL import Image
    root = Path(root)
    for sub in ("JPEGImages", "SegmentationClass", "ImageSets/Segmentation"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    splits = {"train": range(num_images), "val": range(num_images, num_images + max(1, num_images // 4))}
    for split, ids in splits.items():
        names = []
        for i in ids:
            image, mask, _, _ = draw_toy_scene(np.random.default_rng([seed, i]), image_size)
            name = f"synth_{i:05d}"
            Image.fromarray(image).save(root / "JPEGImages" / f"{name}.jpg", quality=95)
            Image.fromarray(mask, mode="L").save(root / "SegmentationClass" / f"{name}.png")
            names.append(name)
        atomic_write_text("\n".join(names) + "\n", root / "ImageSets" / "Segmentation" / f"{split}.txt")
    return root


def load_rgb(path) -> np.ndarray:
    """Any image file -> uint8 (H, W, 3). Grayscale is replicated, RGBA drops alpha, CMYK/YCbCr/palette are
    converted by PIL, 16-bit images are scaled to 8 bits. Unreadable or truncated files -> WSSSError."""
    from PIL import Image
    try:
        with Image.open(path) as im:
            im.load()
            if im.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
                arr = np.asarray(im, dtype=np.float64)
                arr = arr / 257.0 if arr.max() > 255 else arr
                arr = np.repeat(np.clip(arr, 0, 255).astype(np.uint8)[..., None], 3, axis=2)
            else:
                arr = np.asarray(im.convert("RGB"))
    except FileNotFoundError:
        raise WSSSError(f"image listed but missing: {path}")
    except (OSError, SyntaxError, ValueError) as e:
        raise WSSSError(f"cannot read image {path}: {e} (corrupt or truncated file?)")
    return np.ascontiguousarray(arr)


def load_mask(path, num_classes: int) -> np.ndarray:
    """Single-channel PNG (palette indices or grayscale) -> uint8 (H, W) of class ids, 255 = ignore."""
    from PIL import Image
    try:
        with Image.open(path) as im:
            if im.mode not in ("P", "L"):
                raise WSSSError(f"mask {path} has mode {im.mode}; expected a single-channel (palette or "
                                f"grayscale) PNG of class ids")
            mask = np.asarray(im)
    except FileNotFoundError:
        raise WSSSError(f"mask missing: {path}")
    except (OSError, SyntaxError, ValueError) as e:
        raise WSSSError(f"cannot read mask {path}: {e}")
    bad = np.unique(mask[(mask >= num_classes) & (mask != IGNORE)])
    if bad.size:
        raise WSSSError(f"mask {path} has values {bad.tolist()[:5]} >= {num_classes} classes (only 255 may exceed)")
    return mask


def normalize_image(rgb: np.ndarray, norm: str):
    """uint8 (H, W, 3) -> float (3, H, W) normalised with ImageNet (official WeCLIP code) or CLIP statistics."""
    mean, std = (IMAGENET_MEAN, IMAGENET_STD) if norm == "imagenet" else (CLIP_MEAN, CLIP_STD)
    x = (rgb.astype(np.float32) - np.array(mean, np.float32)) / np.array(std, np.float32)
    return torch.from_numpy(x.transpose(2, 0, 1).copy())  # (3, H, W)


def denormalize_image(x, norm: str) -> np.ndarray:
    """float (3, H, W) -> uint8 (H, W, 3), the inverse of normalize_image."""
    mean, std = (IMAGENET_MEAN, IMAGENET_STD) if norm == "imagenet" else (CLIP_MEAN, CLIP_STD)
    rgb = x.detach().float().cpu().numpy().transpose(1, 2, 0) * np.array(std) + np.array(mean)
    return np.clip(np.rint(rgb), 0, 255).astype(np.uint8)  # rounded: truncation lost 1 level in 45 % of values


def augment(rgb: np.ndarray, mask: np.ndarray, cfg: Config, rng: np.random.Generator):
    """WeCLIP's train augmentation: random rescale U(scale_min, scale_max) (bilinear image, nearest mask), h-flip
    p=0.5, random crop of crop_size on a canvas padded with pixel 0 (image) and 255 (mask)."""
    from PIL import Image
    h, w = mask.shape
    r = rng.uniform(cfg.scale_min, cfg.scale_max)
    nh, nw = max(1, int(r * h)), max(1, int(r * w))
    rgb = np.asarray(Image.fromarray(rgb).resize((nw, nh), Image.BILINEAR))
    mask = np.asarray(Image.fromarray(mask).resize((nw, nh), Image.NEAREST))
    if rng.random() < 0.5:
        rgb, mask = rgb[:, ::-1], mask[:, ::-1]
    s = cfg.crop_size
    ch, cw = max(s, nh), max(s, nw)
    canvas = np.zeros((ch, cw, 3), np.uint8)
    canvas_mask = np.full((ch, cw), IGNORE, np.uint8)
    oy, ox = int(rng.integers(0, ch - nh + 1)), int(rng.integers(0, cw - nw + 1))
    canvas[oy:oy + nh, ox:ox + nw], canvas_mask[oy:oy + nh, ox:ox + nw] = rgb, mask
    y0, x0 = int(rng.integers(0, ch - s + 1)), int(rng.integers(0, cw - s + 1))
    return canvas[y0:y0 + s, x0:x0 + s], canvas_mask[y0:y0 + s, x0:x0 + s]


class SegDataset:
    """The VOC folder layout: <root>/JPEGImages/<name>.jpg, <root>/SegmentationClassAug/<name>.png (or
    SegmentationClass/), split lists <root>/ImageSets/Segmentation/<split>.txt (or <root>/<split>.txt).
    Image-level labels are derived from the masks (classes present minus background and 255), so no label
    file is needed; they are scanned once and cached. A map-style dataset (DataLoader needs only __len__ and
    __getitem__). In training, the index encodes (epoch, i) so that augmentation is a pure function of
    (seed, epoch, i): the same on any number of workers and after --resume."""

    def __init__(self, cfg: Config, split: str, train: bool):
        self.cfg, self.split, self.train = cfg, split, train
        info = DATASETS[cfg.dataset]
        self.num_classes = len(info["classes"])
        self.root = Path(cfg.data_root)
        if not cfg.data_root:
            raise WSSSError(f"no --data-root given for {cfg.dataset}: pass --data-root DIR (e.g. "
                            f"VOCdevkit/VOC2012; layout in data.md) or set WSSS_DATA_ROOT, or try --demo")
        if not self.root.is_dir():
            raise WSSSError(f"data root {str(self.root)!r} not found: pass --data-root DIR (layout in data.md) "
                            f"or try --demo")
        lists = [self.root / "ImageSets" / "Segmentation" / f"{split}.txt", self.root / f"{split}.txt"]
        list_path = next((p for p in lists if p.is_file()), None)
        if list_path is None:
            raise WSSSError(f"split list for {split!r} not found; expected {lists[0]} (see data.md)")
        names = [n.strip() for n in list_path.read_text().split() if n.strip()]
        mask_dir = next((d for d in ("SegmentationClassAug", "SegmentationClass") if (self.root / d).is_dir()), None)
        if mask_dir is None:
            raise WSSSError(f"no SegmentationClassAug/ or SegmentationClass/ folder in {self.root} (see data.md)")
        strip = info["mask_strip"]
        self.items = []
        for n in names:
            image = self.root / "JPEGImages" / f"{n}.jpg"
            mask = self.root / mask_dir / f"{re.sub(strip, '', n) if strip else n}.png"
            if not image.is_file():
                raise WSSSError(f"image listed in {list_path.name} but missing: {image}")
            self.items.append((n, image, mask))
        labels = self._scan_labels(list_path)
        self.labels = [labels[n] for n, _, _ in self.items]
        if train:  # WeCLIP needs at least one foreground class per image (GradCAM target)
            keep = [i for i, lab in enumerate(self.labels) if lab]
            if len(keep) < len(self.items):
                print0(f"data: skipped {len(self.items) - len(keep)} {split} images with no foreground class")
            self.items, self.labels = [self.items[i] for i in keep], [self.labels[i] for i in keep]
        if not self.items:
            raise WSSSError(f"split {split!r} in {self.root} has no usable images")
        self.epoch_len = len(self.items)

    def _scan_labels(self, list_path) -> dict:
        """{name: sorted foreground class ids} from the masks, cached under cache_dir (validated by a hash of
        the root, the list and the mask sizes, so an edited dataset is re-scanned)."""
        sig = hashlib.sha1(f"{self.root.resolve()}|{list_path.read_text()}|".encode())
        for _, _, m in self.items[:64]:
            sig.update(str(m.stat().st_size if m.is_file() else -1).encode())
        path = Path(self.cfg.cache_dir) / "labels" / f"{self.cfg.dataset}-{self.split}-{sig.hexdigest()[:12]}.json"
        if path.is_file():
            return json.loads(path.read_text())
        labels = {}
        for n, _, m in self.items:
            present = np.unique(load_mask(m, self.num_classes))
            labels[n] = [int(c) for c in present if 0 < c < self.num_classes]
        try:
            atomic_write_text(json.dumps(labels), path)
        except OSError:
            pass  # a read-only cache only costs a re-scan next time
        return labels

    def __len__(self):
        return len(self.items)

    def __getitem__(self, index: int) -> dict:
        epoch, i = divmod(int(index), self.epoch_len)
        name, image_path, mask_path = self.items[i]
        rgb, mask = load_rgb(image_path), load_mask(mask_path, self.num_classes)
        if rgb.shape[:2] != mask.shape:
            raise WSSSError(f"image {image_path} is {rgb.shape[1]}x{rgb.shape[0]} but its mask is "
                            f"{mask.shape[1]}x{mask.shape[0]}")
        if self.train:
            rgb, mask = augment(rgb, mask, self.cfg, np.random.default_rng([self.cfg.seed, epoch, i]))
        label = torch.zeros(self.num_classes - 1)
        label[[c - 1 for c in self.labels[i]]] = 1.0
        return dict(image=normalize_image(rgb, self.cfg.norm), mask=torch.from_numpy(mask.astype(np.int64)),
                    label=label, name=name)


class EpochSampler:
    """Shuffled indices, re-drawn each epoch from (seed, epoch), sharded across DDP ranks, starting at any
    step: what makes --resume exact. Yields epoch * len + i, decoded by SegDataset.__getitem__."""

    def __init__(self, n: int, batch_size: int, seed: int, start_step: int = 0, rank: int = 0, world: int = 1,
                 overfit: bool = False):
        self.n, self.bs, self.seed, self.rank, self.world, self.overfit = n, batch_size, seed, rank, world, overfit
        self.steps_per_epoch = n // (batch_size * world)
        if self.steps_per_epoch == 0:
            raise WSSSError(f"{n} training images are fewer than one batch ({batch_size} x {world} processes)")
        self.start_step = start_step

    def __iter__(self):
        epoch, skip = divmod(self.start_step, self.steps_per_epoch)
        while True:
            order = torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed * 100003 + epoch))
            per_rank = order[: self.steps_per_epoch * self.bs * self.world].view(self.steps_per_epoch, self.world,
                                                                                  self.bs)  # (steps, world, bs)
            if self.overfit:  # the first batch of epoch 0 (same augmentation) for ever
                while True:
                    yield [int(i) for i in per_rank[0, self.rank]]
            for step in range(skip, self.steps_per_epoch):
                yield [epoch * self.n + int(i) for i in per_rank[step, self.rank]]
            epoch, skip = epoch + 1, 0


# ----------------------------------------------------------------------------------------------------
# Frozen feature extractors: CLIP (open_clip) and DINOv2 (transformers). Lazy imports, eval(), no grad.
# ----------------------------------------------------------------------------------------------------

# The toy CLIP (the architecture of --tiny, and of the model `pretrain-toy` trains for --demo): the same
# open_clip.CLIP class as ViT-B-16, just small.
# Its image embedding is the mean of the projected patch tokens (pool_type="avg"), which is exactly the embedding
# WeCLIP's GradCAM explains, so contrastive pre-training aligns the patch tokens themselves with the texts.
TOY_CLIP = dict(embed_dim=64, text_cfg=dict(context_length=24, vocab_size=49408, width=64, heads=2, layers=2),
                vision_cfg=dict(image_size=64, layers=3, width=96, head_width=32, patch_size=8, pool_type="avg"))
TOY_DINO = dict(hidden_size=48, num_hidden_layers=2, num_attention_heads=2, mlp_ratio=2, patch_size=8, image_size=64)


def toy_clip_path(cfg: Config) -> Path:
    key = hashlib.sha1(json.dumps([TOY_CLIP, cfg.toy_steps, cfg.toy_batch, cfg.toy_lr, cfg.toy_weight_decay,
                                   cfg.toy_warmup, cfg.seed]).encode())
    return Path(cfg.cache_dir) / f"toy-clip-{key.hexdigest()[:10]}.pt"


def _is_path(s: str) -> bool:
    return "/" in s or s.endswith((".pt", ".pth", ".bin", ".safetensors")) or Path(s).exists()


def build_clip(cfg: Config, device):
    """Frozen open_clip CLIP and its tokenizer. --tiny: the toy architecture (random weights unless
    --clip-pretrained is a checkpoint path); otherwise `--clip-model` with `--clip-pretrained` (an open_clip
    tag such as openai, a local file, or "random")."""
    import open_clip
    with torch.random.fork_rng(devices=[]):  # random weights are a pure function of the seed, RNG untouched
        torch.manual_seed(cfg.seed)
        if cfg.tiny:
            model = open_clip.CLIP(**TOY_CLIP)
            if _is_path(cfg.clip_pretrained):
                if not Path(cfg.clip_pretrained).is_file():
                    raise WSSSError(f"CLIP checkpoint not found: {cfg.clip_pretrained}")
                state = torch.load(cfg.clip_pretrained, map_location="cpu", weights_only=True)
                model.load_state_dict(state.get("model", state))
            tokenizer = open_clip.get_tokenizer("ViT-B-16", context_length=TOY_CLIP["text_cfg"]["context_length"])
        else:
            pretrained = None if cfg.clip_pretrained in ("random", "none", "") else cfg.clip_pretrained
            if cfg.clip_model not in open_clip.list_models():
                raise WSSSError(f"unknown --clip-model {cfg.clip_model!r} (open_clip.list_models() has the names)")
            if pretrained and _is_path(pretrained) and not Path(pretrained).is_file():
                raise WSSSError(f"CLIP checkpoint not found: {pretrained}")
            # OpenAI's weights were trained with QuickGELU; open_clip only warns on a mismatch, so ask for it
            tag = open_clip.get_pretrained_cfg(cfg.clip_model, pretrained) if pretrained and not _is_path(pretrained) \
                else {}
            try:
                model = open_clip.create_model(cfg.clip_model, pretrained=pretrained,
                                               force_quick_gelu=bool(tag.get("quick_gelu")))
            except Exception as e:  # open_clip raises RuntimeError offline; unknown names raise others
                raise WSSSError(f"could not load CLIP {cfg.clip_model!r} weights {cfg.clip_pretrained!r} "
                                f"({type(e).__name__}; no network or model hub?): pass a local checkpoint with "
                                f"--clip-pretrained PATH (see data.md), or run offline with --demo / --tiny")
            tokenizer = open_clip.get_tokenizer(cfg.clip_model)
    model = model.to(device).eval().requires_grad_(False)
    assert getattr(model.visual.transformer, "batch_first", True), "expects open_clip's batch-first transformer"
    return model, tokenizer


def build_dino(cfg: Config, device):
    """Frozen DINOv2 (CD-CLIP's boundary features): transformers Dinov2Model; --tiny: a small random one."""
    from transformers import Dinov2Config, Dinov2Model
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed + 1)
        if cfg.tiny:
            model = Dinov2Model(Dinov2Config(**TOY_DINO))
        elif cfg.dino_model == "random":  # the ViT-B/14 architecture of dinov2-base, random weights (bench)
            model = Dinov2Model(Dinov2Config())
        else:
            try:
                model = Dinov2Model.from_pretrained(cfg.dino_model)
            except (OSError, ValueError) as e:
                raise WSSSError(f"could not load DINOv2 {cfg.dino_model!r} ({type(e).__name__}; no network or "
                                f"model hub?): pass a local folder with --dino-model PATH (see data.md), "
                                f"or run offline with --demo / --tiny")
    return model.to(device).eval().requires_grad_(False)


def resized_pos_embed(visual, h: int, w: int):
    """CLIP's positional embedding for an h x w patch grid: the CLS row kept, the pretrained grid resized
    bilinearly (align_corners=False) as WeCLIP's upsample_pos_emb. Cached per grid."""
    cache = visual.__dict__.setdefault("_wsss_pos_cache", {})
    pos = visual.positional_embedding  # (1 + g*g, D)
    if (h, w) not in cache or cache[(h, w)].device != pos.device:
        g = int(round(math.sqrt(pos.shape[0] - 1)))
        grid = pos[1:].reshape(1, g, g, -1).permute(0, 3, 1, 2)  # (1, D, g, g)
        if (h, w) != (g, g):
            grid = F.interpolate(grid, size=(h, w), mode="bilinear", align_corners=False)  # (1, D, h, w)
        cache[(h, w)] = torch.cat([pos[:1], grid.flatten(2)[0].T], 0)  # (1 + h*w, D)
    return cache[(h, w)]


def self_attention(attn, a, need_weights: bool):
    """The block's nn.MultiheadAttention on batch-first a (B, L, D), called in its functional form on a
    contiguous (L, B, D) copy. The module's own batch-first path transposes to a strided view, and when that
    view needs gradients (GradCAM) CPU matmul runs the projections as a per-token bmm: 3x slower here.
    -> output (B, L, D), head-averaged attention (B, L, L) or None."""
    x = a.transpose(0, 1).contiguous()  # (L, B, D)
    out, w = F.multi_head_attention_forward(
        x, x, x, attn.embed_dim, attn.num_heads, attn.in_proj_weight, attn.in_proj_bias, attn.bias_k, attn.bias_v,
        attn.add_zero_attn, attn.dropout, attn.out_proj.weight, attn.out_proj.bias, training=attn.training,
        need_weights=need_weights, average_attn_weights=True)
    return out.transpose(0, 1), w


def run_block(blk, x, need_attn: bool, a=None):
    """One open_clip ResidualAttentionBlock, also returning the head-averaged attention (B, 1+N, 1+N).
    `a` overrides ln_1(x) (GradCAM's hooked activation); the residual still adds x, as in the block."""
    a = blk.ln_1(x) if a is None else a
    out, attn = self_attention(blk.attn, a, need_attn)
    x = x + blk.ls_1(out)
    x = x + blk.ls_2(blk.mlp(blk.ln_2(x)))
    return x, attn


def clip_image_forward(clip, images, n_attn: int = 0) -> dict:
    """WeCLIP's frozen pass: blocks 1..L-1 on any image size. Returns per-block patch tokens (the decoder's
    inputs), the head-averaged patch-to-patch attention of the last `n_attn` of these blocks (B, n_attn, N, N)
    (the others run fused attention, which never materialises the map), and the block-(L-1) output that
    GradCAM runs the last block on. Blocks 1..L-1 never need gradients."""
    visual = clip.visual
    blocks = visual.transformer.resblocks[:-1]
    with torch.no_grad():
        x = visual.conv1(images.to(visual.conv1.weight.dtype))  # (B, D, h, w)
        B, D, h, w = x.shape
        x = x.flatten(2).transpose(1, 2)  # (B, N, D), row-major token order
        x = torch.cat([visual.class_embedding.to(x.dtype).expand(B, 1, D), x], 1)  # (B, 1+N, D)
        x = visual.ln_pre(x + resized_pos_embed(visual, h, w).to(x.dtype))
        feats, attns = [], []
        for i, blk in enumerate(blocks):
            x, attn = run_block(blk, x, need_attn=i >= len(blocks) - n_attn)
            feats.append(x[:, 1:])  # (B, N, D)
            if attn is not None:
                attns.append(attn[:, 1:, 1:])  # (B, N, N): CLS row and column dropped
    return dict(feats=feats, attn=torch.stack(attns, 1) if attns else None, x_last=x, grid=(h, w))


def attn_blocks_needed(cfg: Config, num_blocks: int) -> int:
    """How many of blocks 1..L-1 must return attention maps for --refine (the last block's comes from
    GradCAM): the static mean uses the last attn_layers blocks, dynamic RFM the last rfm_dynamic_layers."""
    if cfg.refine == "none":
        return 0
    n = max(cfg.attn_layers, cfg.rfm_dynamic_layers if "rfm" in cfg.refine else 0)
    return min(n, num_blocks) - 1


def encode_texts(clip, tokenizer, names, template: str, device):
    """L2-normalised text embeddings (T, E) of `template.format(name)` (WeCLIP's zeroshot_classifier)."""
    with torch.no_grad():
        tokens = tokenizer([template.format(n) for n in names]).to(device)
        return F.normalize(clip.encode_text(tokens).float(), dim=-1)


def dino_features(dino, images, norm: str):
    """DINOv2 last-layer normalised patch tokens, L2-normalised per token: (B, Dd, hd, wd). The input is
    resized to (H//p*p, W//p*p) (308 for a 320 crop with p = 14) and given ImageNet statistics."""
    p = dino.config.patch_size
    H, W = images.shape[-2:]
    x = images if norm == "imagenet" else renormalize(images, "clip", "imagenet")
    x = F.interpolate(x, size=(H // p * p, W // p * p), mode="bilinear", align_corners=False)
    with torch.no_grad():
        tokens = dino(pixel_values=x.to(dino.dtype)).last_hidden_state  # (B, 1 + regs + Nd, Dd)
    tokens = tokens[:, 1 + getattr(dino.config, "num_register_tokens", 0):]
    tokens = F.normalize(tokens.float(), dim=-1)
    return tokens.transpose(1, 2).reshape(images.shape[0], -1, H // p, W // p)  # (B, Dd, hd, wd)


def renormalize(x, src: str, dst: str):
    stats = {"imagenet": (IMAGENET_MEAN, IMAGENET_STD), "clip": (CLIP_MEAN, CLIP_STD)}
    (m0, s0), (m1, s1) = stats[src], stats[dst]
    t = lambda v: torch.tensor(v, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
    return (x * t(s0) + t(m0) - t(m1)) / t(s1)


class Frozen:
    """Everything frozen for one run: CLIP, its text bank, DINOv2 (only for methods that need it)."""

    def __init__(self, cfg: Config, device, need_dino: bool = None):
        info = DATASETS[cfg.dataset]
        self.cfg, self.device = cfg, device
        self.clip, self.tokenizer = build_clip(cfg, device)
        supers = info["superclasses"][cfg.superclasses]
        self.num_fg, self.num_super = len(info["classes"]) - 1, len(supers)
        # text bank: [C foreground prompts; Ns super-class prompts; Nb background prompts], (T, E)
        self.texts = encode_texts(self.clip, self.tokenizer, info["prompts"] + list(supers) + info["bg_prompts"],
                                  cfg.template, device)
        # class id (1..C) -> super-class id (1..Ns); 0 -> 0
        index = {name: i + 1 for i, name in enumerate(supers)}
        owner = {c: index[s] for s, members in supers.items() for c in members}
        self.super_of = torch.tensor([0] + [owner[c] for c in info["classes"][1:]], device=device)
        need_dino = cfg.lambda_b > 0 if need_dino is None else need_dino
        self.dino = build_dino(cfg, device) if need_dino else None
        self.patch = self.clip.visual.conv1.kernel_size[0]
        self.num_blocks = len(self.clip.visual.transformer.resblocks)


# ----------------------------------------------------------------------------------------------------
# CAMs: WeCLIP GradCAM on image-text probabilities, every (image, class) pair in one forward/backward
# ----------------------------------------------------------------------------------------------------

def cam_rows(labels, frozen: Frozen, with_super: bool = False) -> dict:
    """One GradCAM row per (image, present class) and optionally per (image, present super-class).
    Row r explains text `target[r]` of the bank, competing only with the texts `allowed[r]` (T,): the
    image's present classes (or super-classes) and all background prompts (WeCLIP §3: absent classes take no
    part in the softmax). `cls[r]` is the class id (1..C) or super-class id (1..Ns) the row stands for."""
    B, C = labels.shape
    T, Ns = frozen.texts.shape[0], frozen.num_super
    img, cls = torch.nonzero(labels > 0, as_tuple=True)  # ascending class id within each image
    cls = cls + 1
    bg = torch.zeros(T, dtype=torch.bool, device=labels.device)
    bg[C + Ns:] = True
    allowed_fg = torch.cat([labels > 0, torch.zeros(B, T - C, dtype=torch.bool, device=labels.device)], 1) | bg
    rows = dict(img=img, cls=cls, target=cls - 1, allowed=allowed_fg[img], is_super=torch.zeros_like(img).bool())
    if with_super:
        s_present = torch.zeros(B, Ns + 1, dtype=torch.bool, device=labels.device)
        s_present[img, frozen.super_of[cls]] = True
        s_img, s_id = torch.nonzero(s_present[:, 1:], as_tuple=True)
        allowed_s = torch.zeros(B, T, dtype=torch.bool, device=labels.device)
        allowed_s[:, C:C + Ns] = s_present[:, 1:]
        rows = {k: torch.cat([v, extra]) for (k, v), extra in zip(rows.items(), [
            s_img, s_id + 1, C + s_id, (allowed_s | bg)[s_img], torch.ones_like(s_img).bool()])}
    return rows


def gradcam(frozen: Frozen, out: dict, rows: dict):
    """WeCLIP GradCAM (spec §3) for all rows at once. Each row replicates its image's block-(L-1) output and
    runs the last block on it; the hooked activation A is the last block's ln_1 output, whose gradient
    reaches it only through attention. Target y_r = softmax(s * <e, t_k>)[target_r], e = proj(mean of ln_post
    patch tokens) normalised, over the row's allowed texts. Rows are independent, so one backward of sum_r y_r
    yields every row's own gradient: the same CAMs as one backward per class, in one pass.
    GradCAM: alpha = spatial mean of dy/dA; cam = ReLU(sum_ch alpha_ch A_ch), min-max twice (as upstream).
    Returns cams (R, h, w), the last block's attention per image (B, N, N) and its final patch embeddings
    (B, N, E), L2-normalised (CD-CLIP's F)."""
    clip, h, w = frozen.clip, *out["grid"]
    visual, blk = clip.visual, clip.visual.transformer.resblocks[-1]
    x = out["x_last"][rows["img"]]  # (R, 1+N, D)
    with torch.enable_grad():
        a = blk.ln_1(x).detach().requires_grad_(True)  # (R, 1+N, D): the hooked activation
        y, _ = run_block(blk, x, need_attn=False, a=a)  # fused attention: its backward is cheaper
        post = visual.ln_post(y[:, 1:])  # (R, N, D)
        # as a 2-D product: a 3-D @ 2-D matmul whose left side needs grad runs as a slow bmm on CPU
        tokens = (post.reshape(-1, post.shape[-1]) @ visual.proj).view(*post.shape[:2], -1)  # (R, N, E)
        e = F.normalize(tokens.mean(1).float(), dim=-1)  # (R, E): mean of patch tokens, not CLS
        scale = frozen.cfg.cam_logit_scale or float(clip.logit_scale.exp())
        logits = scale * e @ frozen.texts.T  # (R, T)
        prob = logits.masked_fill(~rows["allowed"], float("-inf")).softmax(-1)
        target = prob.gather(1, rows["target"][:, None]).sum()
        (grad,) = torch.autograd.grad(target, a)  # (R, 1+N, D)
    A, G = a.detach()[:, 1:].float(), grad[:, 1:].float()  # (R, N, D): CLS dropped
    # GradCAM: alpha_ch = mean_n dy/dA_n,ch; cam_n = ReLU(sum_ch alpha_ch A_n,ch)
    cam = torch.relu((A * G.mean(1, keepdim=True)).sum(-1))  # (R, N)
    cam = minmax(minmax(cam.view(-1, h, w)))  # (R, h, w): scale_cam_image per layer, then after the layer mean
    first = first_row_of_image(rows["img"], out["x_last"].shape[0])  # all rows of an image share these
    with torch.no_grad():  # the last block's attention map, once per image (identical for its rows)
        attn_last = self_attention(blk.attn, blk.ln_1(out["x_last"]), True)[1][:, 1:, 1:].float()  # (B, N, N)
    patch_emb = F.normalize(tokens.detach()[first].float(), dim=-1)  # (B, N, E)
    return cam, attn_last, patch_emb


def first_row_of_image(img, B: int):
    """Index of the first row of each image (rows are grouped by image, ascending)."""
    first = torch.full((B,), -1, dtype=torch.long, device=img.device)
    first.scatter_reduce_(0, img, torch.arange(len(img), device=img.device), reduce="amin", include_self=False)
    assert (first >= 0).all(), "every image needs at least one GradCAM row (a foreground class)"
    return first


# ----------------------------------------------------------------------------------------------------
# CAM refinements: transition matrix, box masks, RFM (WeCLIP), CDA (CD-CLIP), PAR, pseudo-label assembly
# ----------------------------------------------------------------------------------------------------

def sinkhorn_symmetrize(attn, rounds: int = 3):
    """WeCLIP compute_trans_mat without the final square: `rounds` times normalise columns then rows to sum
    1, then symmetrise (T + T^T) / 2. (..., N, N) -> (..., N, N); doubly stochastic up to the last round."""
    t = attn
    for _ in range(rounds):
        t = t / t.sum(-2, keepdim=True)  # each column sums to 1
        t = t / t.sum(-1, keepdim=True)  # each row sums to 1
    return (t + t.transpose(-1, -2)) / 2


def transition_matrix(attn, power: int = 2):
    """WeCLIP's transition matrix: Sinkhorn-like normalisation (3 rounds), symmetrisation, then T^power
    (upstream squares: power 2). (..., N, N) -> (..., N, N)."""
    return torch.linalg.matrix_power(sinkhorn_symmetrize(attn), power)


def connected_components(on):
    """8-connected components of boolean maps (M, h, w) -> int64 ids (M, h, w), 0 off, else the largest flat
    index + 1 in the component. Label propagation by 3x3 max-pooling until nothing changes (few rounds on
    a CAM grid); replaces cv2.findContours, whose outer contours are 8-connected too."""
    M, h, w = on.shape
    ids = (torch.arange(1, h * w + 1, device=on.device).view(1, h, w) * on).float()
    while True:
        grown = F.max_pool2d(ids[:, None], 3, stride=1, padding=1)[:, 0] * on  # (M, h, w)
        if torch.equal(grown, ids):
            return ids.long()
        ids = grown


def box_mask(cam, threshold: float, exclusive_edge: bool = False):
    """WeCLIP box masks (clip/utils.py): s = uint8(255 cam); on <=> s > floor(threshold * max s); the union of
    the bounding boxes of the on-regions (all contours of cv2.findContours(RETR_TREE): holes' boxes lie
    inside their region's box, so the union of the 8-connected components' boxes is the same).
    `exclusive_edge` reproduces upstream's quirk (boxes end one row/column early, and clip to h-1/w-1, so the
    last row and column are never boxed); by default full boxes [upstream bug fixed].
    cam (..., h, w) in [0, 1] -> bool (..., h, w)."""
    shape, (h, w) = cam.shape, cam.shape[-2:]
    s = (cam.reshape(-1, h, w) * 255).to(torch.uint8).long()  # (M, h, w), truncation as numpy's astype
    thr = (threshold * s.amax((1, 2), keepdim=True).double()).floor().long()
    ids = connected_components(s > thr)  # (M, h, w)
    M, big = ids.shape[0], h * w + 1
    yy = torch.arange(h, device=cam.device).view(1, h, 1).expand(M, h, w)
    xx = torch.arange(w, device=cam.device).view(1, 1, w).expand(M, h, w)

    def reduce(v, how):  # per-component min/max of a coordinate, (M, h*w + 1); id 0 = background slot
        init = torch.full((M, big), big if how == "amin" else -1, device=cam.device, dtype=torch.long)
        return init.scatter_reduce(1, ids.flatten(1), v.flatten(1), reduce=how, include_self=True)

    y0, y1, x0, x1 = reduce(yy, "amin"), reduce(yy, "amax"), reduce(xx, "amin"), reduce(xx, "amax")
    if exclusive_edge:
        y1, x1 = y1.clamp(max=h - 2), x1.clamp(max=w - 2)
    y0, y1, x0, x1 = (t[:, 1:, None, None] for t in (y0, y1, x0, x1))  # (M, h*w, 1, 1), slot 0 dropped
    inside = (yy[:, None] >= y0) & (yy[:, None] <= y1) & (xx[:, None] >= x0) & (xx[:, None] <= x1)
    return inside.any(1).view(shape)  # (M, h*w, h, w) -> any component -> (..., h, w)


def rfm_weights(attn_all, cfg: Config, S=None, dynamic: bool = False):
    """WeCLIP RFM affinity before normalisation (clip_tool.py). attn_all (B, L, N, N) holds every block's
    head-averaged patch attention (the last from the GradCAM pass).
    Static: W = mean of the last `attn_layers` blocks.
    Dynamic (training step >= rfm_dynamic_after, and at test time): among the last `rfm_dynamic_layers`
    blocks keep those with d_l = sum(S - A_l) <= mean_l d_l (a signed sum, as upstream: since sum S is the
    same for every l, this keeps the blocks of at least average attention mass), average them, and gate
    by the decoder affinity: W = mean_sel(A_l) * S."""
    if not dynamic or S is None:
        return attn_all[:, -cfg.attn_layers:].mean(1)  # (B, N, N)
    cand = attn_all[:, -cfg.rfm_dynamic_layers:]  # (B, n, N, N)
    d = (S[:, None] - cand).sum((-2, -1))  # (B, n)
    m = (d <= d.mean(1, keepdim=True)).to(cand.dtype)  # (B, n) layer selection
    W = (m[:, :, None, None] * cand).sum(1) / (m.sum(1)[:, None, None] + 1e-5)  # (B, N, N)
    return W * S


def class_distributions(patch_emb, texts, over: str = "patch"):
    """CD-CLIP §3.1: P = softmax(S_a) with S_a = Min-max(CosSim(F, T_all)). patch_emb (B, N, E) and texts
    (K, E) L2-normalised. Min-max per text over the patches (`over="patch"`, default [I]) removes each
    prompt's global bias; `over="text"` normalises each patch over the texts. -> (B, N, K), rows sum to 1."""
    s = patch_emb @ texts.T  # (B, N, K) cosine similarities
    # S_a = Min-max(CosSim(F, T_all)); P = Softmax(S_a) over the C + N texts
    s_a = minmax(s, dims=(1,)) if over == "patch" else minmax(s, dims=(2,))
    return s_a.softmax(-1)


def js_divergence_matrix(probs, max_elems: int = 2**18):
    """Pairwise Jensen-Shannon divergences (natural log) between the rows of probs (..., N, K) -> (..., N, N):
    D_ij = H(M_ij) - H(P_i)/2 - H(P_j)/2 with M_ij = (P_i + P_j) / 2 (CD-CLIP §3.2). Fully broadcast; rows are
    processed in chunks so the (rows, N, K) mixture never exceeds `max_elems` elements: bounded memory for
    COCO's 92 texts, and cache-sized chunks are also the fastest (400 x 25: 4 ms vs 8 ms in one piece)."""
    p = probs.float()
    ent = -(p * p.clamp_min(1e-12).log()).sum(-1)  # (..., N)
    N, K = p.shape[-2:]
    step = max(1, max_elems // max(1, N * K * int(np.prod(p.shape[:-2]))))
    out = []
    for i in range(0, N, step):
        m = (p[..., i:i + step, None, :] + p[..., None, :, :]) / 2  # (..., n, N, K): M_ij = (P_i + P_j) / 2
        h_m = -(m * m.clamp_min(1e-12).log()).sum(-1)  # (..., n, N)
        # D_JS(P_i || P_j) = 1/2 KL(P_i || M_ij) + 1/2 KL(P_j || M_ij) = H(M_ij) - (H(P_i) + H(P_j)) / 2
        out.append(h_m - ent[..., i:i + step, None] / 2 - ent[..., None, :] / 2)
    return torch.cat(out, -2).clamp_min(0)  # tiny negative rounding -> 0


def cda_affinity(probs, a_init, tau: float):
    """CD-CLIP Eq. for A_d: S_d = (1 - D_JS) / tau; A_d = Softmax(S_d) . A_init, a row-wise softmax and a
    matrix product [I]. The constant 1 cancels in the softmax: W = softmax(-D_JS / tau).
    probs (..., N, K), a_init (..., N, N) -> A_d (..., N, N), row-stochastic when A_init is."""
    # S_d = (1 - D_JS(Softmax(S_a) || Softmax(S_a)^T)) / tau; W = Softmax(S_d), row-wise
    W = ((1 - js_divergence_matrix(probs)) / tau).softmax(-1)  # (..., N, N)
    # A_d = Softmax(S_d) . A_init
    return W @ a_init


def propagation_matrix(frozen: Frozen, attn_all, patch_emb, cfg: Config, S=None, dynamic=False):
    """The matrix A^t that refines the CAMs, per --refine (CD-CLIP Table 3 rows):
      none      identity (the raw GradCAM)
      caa       Sinkhorn-symmetrised mean attention of the last blocks, squared; box-masked (CAA)
      rfm       WeCLIP RFM: the same, with dynamic layer selection and the decoder affinity S once active
      cda       A_d = softmax(-D_JS/tau) A_init with A_init the Sinkhorn-symmetrised mean attention; no box
      cda+caa / cda+rfm   A_d on top of that affinity, with box masks.
    (B, L, N, N) -> (B, N, N)."""
    if cfg.refine == "none":
        B, N = attn_all.shape[0], attn_all.shape[-1]
        return torch.eye(N, device=attn_all.device).expand(B, N, N)
    W = rfm_weights(attn_all, cfg, S, dynamic=dynamic and "rfm" in cfg.refine)
    if not cfg.refine.startswith("cda"):  # WeCLIP's T^2 . (B_c * M^c): the power is taken once per image
        return transition_matrix(W, cfg.power)
    A_init = sinkhorn_symmetrize(W)  # unsquared
    texts = frozen.texts if cfg.cda_bg_texts else frozen.texts[: frozen.num_fg + frozen.num_super]  # T_all
    A_d = cda_affinity(class_distributions(patch_emb, texts, cfg.cda_minmax), A_init, cfg.cda_tau)
    # M_re^c = (A_d)^t . M_init^c
    return torch.linalg.matrix_power(A_d, cfg.power)


def refine_cams(cams, img, A, box=None):
    """r_c = A^t (B_c * m_c): propagate each row's CAM with its image's matrix (WeCLIP: box-masked source
    tokens, i.e. columns). cams (R, h, w), img (R,), A (B, N, N), box (R, h, w) bool or None -> (R, h, w)."""
    m = cams.flatten(1) if box is None else (cams * box).flatten(1)  # (R, N)
    # r_c = A^t . vec(B_c * m_c): each token gathers from the tokens it is affine to
    return torch.bmm(A[img], m[:, :, None])[:, :, 0].view_as(cams)


PAR_OFFSETS = ((-1, -1), (-1, 0), (-1, 1), (0, -1), (0, 1), (1, -1), (1, 0), (1, 1))  # (dy, dx), upstream order


def par_refine(image, masks, dilations=(1, 2, 4, 8, 12, 24), iters: int = 20, w1: float = 0.3, w2: float = 0.01):
    """PAR, pixel-adaptive refinement (WeCLIP PAR.py). image (B, 3, H', W') is resized to the masks' size
    (bilinear, align_corners=True). Each pixel p has 8 neighbours per dilation (48), read with replicate
    padding. kappa_k(p) = -mean_c(|I_k,c - I_c| / (sigma_c(p) + 1e-8) / w1)^2 with sigma_c the unbiased std of
    the 48 neighbour values; pi_k = softmax(-(rho_k / (sigma_rho + 1e-8) / w1)^2) with rho_k = d or sqrt(2) d;
    a_k(p) = softmax_k(kappa(p)) + w2 pi_k (weights sum to 1 + w2, as upstream). Then `iters` times
    M(p) <- sum_k a_k(p) M(p + o_k). masks (B, K, H, W) -> (B, K, H, W), unnormalised (argmax is used)."""
    B, K, H, W = masks.shape
    if image.shape[-2:] != (H, W):
        image = F.interpolate(image, size=(H, W), mode="bilinear", align_corners=True)
    offsets = [(dy * d, dx * d) for d in dilations for dy, dx in PAR_OFFSETS]
    pad = max(dilations)

    def neighbours(x):  # (B, C, H, W) -> list over the 48 offsets of (B, C, H, W) views of the padded map
        xp = F.pad(x, (pad, pad, pad, pad), mode="replicate")
        return [xp[:, :, pad + dy:pad + dy + H, pad + dx:pad + dx + W] for dy, dx in offsets]

    # Two passes over the 48 neighbour views instead of one (B, 3, 48, H, W) stack (8x less memory traffic).
    # Pass 1: the unbiased std of the neighbour values, from sums of d_k = I_k - I (std is shift-invariant).
    image = image.float()
    views, n = neighbours(image), len(offsets)
    s1, s2 = torch.zeros_like(image), torch.zeros_like(image)
    for v in views:
        d = v - image
        s1 += d
        s2.addcmul_(d, d)
    sigma = ((s2 - s1 * s1 / n) / (n - 1)).clamp_min(0).sqrt()  # (B, 3, H, W)
    # Pass 2: kappa_k = -mean_c (d_k,c / (sigma_c + 1e-8) / w1)^2, with the per-pixel factors folded in once
    inv = 1.0 / ((sigma + 1e-8) * w1).pow(2) / image.shape[1]  # (B, 3, H, W)
    kappa = torch.stack([-((v - image).pow(2) * inv).sum(1) for v in views], 1)  # (B, 48, H, W)
    rho = torch.tensor([math.hypot(dy, dx) for dy, dx in offsets], device=masks.device)
    pi = (-(rho / (rho.std() + 1e-8) / w1).pow(2)).softmax(0)  # (48,), the same for every pixel
    aff = kappa.softmax(1) + w2 * pi[None, :, None, None]  # (B, 48, H, W), sums to 1 + w2
    aff = aff[:, None]  # (B, 1, 48, H, W)
    m = masks.float()
    for _ in range(iters):
        views = neighbours(m)
        acc = aff[:, :, 0] * views[0]
        for k in range(1, len(views)):
            acc = acc.addcmul_(aff[:, :, k], views[k])
        m = acc
    return m


def label_scores(cams, img, cls, B: int, size, bg_pow: float):
    """WeCLIP generate_cam_label up to PAR: min-max each refined CAM, upsample (bilinear) to `size`, and pack
    the rows of each image into channels after a background channel (1 - max_c CAM)^bg_pow. Unused channels
    are -1 and never win. cams (R, h, w), img (R,), cls (R,) ids -> scores (B, 1+K, H, W) and the channel ->
    id table (B, 1+K)."""
    up = F.interpolate(minmax(cams)[:, None], size=size, mode="bilinear", align_corners=False)[:, 0]  # (R, H, W)
    slot = torch.zeros_like(img)
    for b in range(B):  # rank of each row within its image (B is small)
        sel = img == b
        slot[sel] = torch.arange(int(sel.sum()), device=img.device)
    k = int(slot.max()) + 1 if len(slot) else 0
    score = torch.full((B, 1 + k, *size), -1.0, device=cams.device)  # (B, 1+K, H, W)
    score[img, 1 + slot] = up
    score[:, 0] = (1 - score[:, 1:].amax(1).clamp_min(0)).pow(bg_pow) if k else 1.0
    lut = torch.zeros(B, 1 + k, dtype=torch.long, device=cams.device)
    lut[img, 1 + slot] = cls
    return score, lut


def cams_to_labels(groups, images, cfg: Config, use_par: bool = True, size=None):
    """Pseudo-labels from groups of (cams, img, cls) rows: label_scores, PAR on the image, argmax, channel ->
    id. PAR's affinity depends on the image only, so all groups (CD-CLIP: the class CAMs and the super-class
    prototype CAMs) share one PAR call. -> one (B, H, W) int64 map per group (no ignore pixels, as upstream)."""
    B, size = images.shape[0], tuple(size or images.shape[-2:])
    scored = [label_scores(cams, img, cls, B, size, cfg.bg_pow) for cams, img, cls in groups]
    score = torch.cat([sc for sc, _ in scored], 1)  # (B, sum_g (1+K_g), H, W)
    if use_par:
        score = par_refine(images, score, cfg.par_dilations, cfg.par_iters, cfg.par_w1, cfg.par_w2)
    labels, start = [], 0
    for sc, lut in scored:
        part = score[:, start:start + sc.shape[1]]
        labels.append(lut.gather(1, part.argmax(1).flatten(1)).view(B, *size))
        start += sc.shape[1]
    return labels


def cams_to_label(cams, img, cls, images, cfg: Config, use_par: bool = True, size=None):
    """cams_to_labels for one group: (R, h, w) CAMs -> (B, H, W) pseudo-labels."""
    return cams_to_labels([(cams, img, cls)], images, cfg, use_par, size)[0]


def cap_prototype_cams(cams_s, img, dino_feat, theta: float):
    """CD-CLIP §4.4. Class-aware pooling (CAP): each super-class CAM, resized to the DINO grid and kept where
    >= theta_cap, weights an average of the DINO tokens -> prototype f_n (L2-normalised); prototype CAM
    M_p^n = ReLU(cos(f_n, F_d)). cams_s (R, h, w), img (R,), dino_feat (B, Dd, hd, wd) -> (R, hd, wd) in [0,1]."""
    m = F.interpolate(cams_s[:, None], size=dino_feat.shape[-2:], mode="bilinear", align_corners=False)[:, 0]
    m = m * (m >= theta)  # (R, hd, wd)
    feats = dino_feat[img]  # (R, Dd, hd, wd)
    # f_s^n = CAP(M_s^n * F_d): the mask-weighted average of the DINO tokens, L2-normalised
    proto = F.normalize(torch.einsum("rhw,rdhw->rd", m, feats) / (m.sum((1, 2))[:, None] + 1e-5), dim=-1)
    # M_p^n = ReLU(CosSim(f_s^n, F_d)); the tokens are unit vectors, so the dot product is the cosine
    return torch.relu(torch.einsum("rd,rdhw->rhw", proto, feats))


def make_pseudo_labels(frozen: Frozen, out: dict, images, labels, cfg: Config, S=None, dynamic=False,
                       with_super=None, use_par=True, size=None, keep_cams=False) -> dict:
    """The whole label path of one batch: GradCAM for every (image, class) [and super-class] row in one
    pass, the method's propagation matrix, box masks where the mode uses them, pseudo-labels Y (B, H, W)
    and, for CD-CLIP's SBE, super-class pseudo-labels Y_s (B, H, W) from DINO prototype CAMs."""
    with fp32(images.device):  # the label path is fp32 whatever the training autocast (see compute_losses)
        return _make_pseudo_labels(frozen, out, images.float(), labels, cfg, S, dynamic, with_super, use_par,
                                   size, keep_cams)


def _make_pseudo_labels(frozen, out, images, labels, cfg, S, dynamic, with_super, use_par, size, keep_cams):
    with_super = cfg.lambda_b > 0 if with_super is None else with_super
    # 1. initial CAMs M_init: one GradCAM row per (image, class) [and (image, super-class)], one backward
    rows = cam_rows(labels, frozen, with_super=with_super)
    cams, attn_last, patch_emb = gradcam(frozen, out, rows)
    # 2. the affinity: attention of the last blocks (+ the decoder's S, + class distributions) -> A^t
    attn_all = attn_last[:, None] if out["attn"] is None else \
        torch.cat([out["attn"].float(), attn_last[:, None]], 1)  # (B, n_attn + 1, N, N): the last blocks
    A = propagation_matrix(frozen, attn_all, patch_emb, cfg, S=S, dynamic=dynamic)  # (B, N, N)
    # 3. propagate each class CAM; WeCLIP/CAA first keep only source tokens inside the CAM's boxes
    c = ~rows["is_super"]
    use_box = cfg.refine.endswith(("caa", "rfm"))
    box = box_mask(cams[c], cfg.box_threshold, cfg.box_exclusive_edge) if use_box else None
    refined = refine_cams(cams[c], rows["img"][c], A, box)
    groups = [(refined, rows["img"][c], rows["cls"][c])]
    if with_super:  # SBE: super-class GradCAMs -> CAP prototypes on DINO tokens -> prototype CAMs
        s = rows["is_super"]
        cams_s = minmax(refine_cams(cams[s], rows["img"][s], A)) if cfg.sbe_refine else cams[s]
        dino_feat = dino_features(frozen.dino, images, cfg.norm)
        # Y_s by the class recipe: prototype CAMs min-maxed, then upsampled, bg = 1 - max, PAR, argmax [I]
        groups.append((cap_prototype_cams(cams_s, rows["img"][s], dino_feat, cfg.cap_threshold), rows["img"][s],
                       rows["cls"][s]))
    labels = cams_to_labels(groups, images, cfg, use_par, size)  # Y and Y_s share one PAR
    result = dict(Y=labels[0], Y_s=labels[1]) if with_super else dict(Y=labels[0])
    if keep_cams:
        result.update(rows=rows, cams=cams, refined=refined)
    return result


# ----------------------------------------------------------------------------------------------------
# Decoder: the only trained module (WeCLIP §6)
# ----------------------------------------------------------------------------------------------------

class QuickGELU(nn.Module):
    def forward(self, x):
        return x * torch.sigmoid(1.702 * x)


class DecoderBlock(nn.Module):
    """Pre-LN transformer block: x + MHA(LN(x)), x + MLP(LN(x)); MLP width -> mlp -> width, QuickGELU."""

    def __init__(self, width: int, heads: int, mlp: int):
        super().__init__()
        self.ln_1, self.ln_2 = nn.LayerNorm(width), nn.LayerNorm(width)
        self.attn = nn.MultiheadAttention(width, heads, batch_first=True)  # xavier in_proj, zero biases
        self.mlp = nn.Sequential(nn.Linear(width, mlp), QuickGELU(), nn.Linear(mlp, width))

    def forward(self, x):  # (B, N, width)
        x = x + self_attention(self.attn, self.ln_1(x), need_weights=False)[0]
        return x + self.mlp(self.ln_2(x))


class SegDecoder(nn.Module):
    """WeCLIP decoder. Fuse head: per-block MLP (D -> dim -> dim) over the patch tokens of CLIP blocks
    1..L-1, concatenated, 1x1 conv -> dim, Dropout2d -> F (B, dim, h, w). Then `layers` pre-LN transformer
    blocks and a 1x1 conv to the K classes. Affinity head S = sigmoid(F^T F) (B, N, N), which the dynamic
    RFM uses and the affinity loss trains. VOC + ViT-B/16: 5,985,045 parameters, as upstream."""

    def __init__(self, in_dim: int, n_feats: int, num_classes: int, dim=256, layers=3, heads=8, mlp=1024,
                 dropout=0.1):
        super().__init__()
        self.mlps = nn.ModuleList(nn.Sequential(nn.Linear(in_dim, dim), nn.ReLU(), nn.Linear(dim, dim))
                                  for _ in range(n_feats))
        self.fuse = nn.Conv2d(n_feats * dim, dim, 1)
        self.dropout = nn.Dropout2d(dropout)
        self.blocks = nn.ModuleList(DecoderBlock(dim, heads, mlp) for _ in range(layers))
        self.classifier = nn.Conv2d(dim, num_classes, 1)

    def forward(self, feats, grid):
        """feats: list of (B, N, D) patch tokens; grid (h, w) -> logits (B, K, h, w), S (B, N, N)."""
        (h, w), B = grid, feats[0].shape[0]
        x = torch.cat([mlp(f.float()) for mlp, f in zip(self.mlps, feats)], -1)  # (B, N, n*dim)
        x = x.transpose(1, 2).reshape(B, -1, h, w)  # (B, n*dim, h, w)
        f = self.dropout(self.fuse(x))  # (B, dim, h, w): F
        t = f.flatten(2).transpose(1, 2)  # (B, N, dim)
        for blk in self.blocks:
            t = blk(t)
        logits = self.classifier(t.transpose(1, 2).reshape(B, -1, h, w))  # (B, K, h, w)
        fn = f.flatten(2)  # (B, dim, N)
        S = torch.sigmoid(fn.transpose(1, 2) @ fn)  # (B, N, N)
        return logits, S


def build_decoder(cfg: Config, frozen: Frozen):
    width = frozen.clip.visual.conv1.out_channels
    return SegDecoder(width, frozen.num_blocks - 1, frozen.num_fg + 1, cfg.dec_dim, cfg.dec_layers,
                      cfg.dec_heads, cfg.dec_mlp, cfg.dec_dropout)


# ----------------------------------------------------------------------------------------------------
# Losses: balanced CE (L_seg), affinity loss (WeCLIP L_aff), gated super-class Dice (CD-CLIP L_b)
# ----------------------------------------------------------------------------------------------------

def balanced_ce_loss(logits, labels):
    """WeCLIP L_seg = 1/2 CE over background pixels + 1/2 CE over foreground pixels (255 ignored); logits are
    upsampled (bilinear) to the labels. A batch without foreground (or background) pixels averages the terms
    that exist instead of giving NaN [upstream bug fixed]. logits (B, K, h, w), labels (B, H, W) -> scalar."""
    if logits.shape[-2:] != labels.shape[-2:]:
        logits = F.interpolate(logits, size=labels.shape[-2:], mode="bilinear", align_corners=False)
    ce = F.cross_entropy(logits.float(), labels, ignore_index=IGNORE, reduction="none")  # (B, H, W)
    # L_seg = 1/2 CE(bg pixels) + 1/2 CE(fg pixels)
    groups = [labels == 0, (labels != 0) & (labels != IGNORE)]
    terms = [ce[g].mean() for g in groups if g.any()]
    return sum(terms) / len(terms) if terms else logits.sum() * 0.0


_RADIUS_MASKS = {}


def radius_mask(h: int, w: int, radius: int, device):
    """(N, N) bool: token pairs within Chebyshev distance `radius` (WeCLIP get_mask_by_radius), cached."""
    key = (h, w, radius, str(device))
    if key not in _RADIUS_MASKS:
        yy, xx = torch.meshgrid(torch.arange(h, device=device), torch.arange(w, device=device), indexing="ij")
        yy, xx = yy.flatten(), xx.flatten()
        _RADIUS_MASKS[key] = ((yy[:, None] - yy[None]).abs() <= radius) & ((xx[:, None] - xx[None]).abs() <= radius)
    return _RADIUS_MASKS[key]


def affinity_labels(labels, grid, radius: int):
    """WeCLIP affinity targets: labels downsampled (nearest, i.e. pixel (16u, 16v)) to the token grid;
    1 where two tokens share a label, 0 where not, 255 outside the radius window or at ignore tokens.
    labels (B, H, W) -> (B, N, N) int64."""
    y = F.interpolate(labels[:, None].float(), size=grid, mode="nearest")[:, 0].long().flatten(1)  # (B, N)
    aff = (y[:, :, None] == y[:, None, :]).long()  # (B, N, N)
    ignore = (y == IGNORE)[:, :, None] | (y == IGNORE)[:, None, :] | ~radius_mask(*grid, radius, labels.device)
    return aff.masked_fill(ignore, IGNORE)


def affinity_loss(pred, target):
    """WeCLIP L_aff (utils/losses.py), an L1 form on the sigmoid affinity S:
    1/2 sum_{Y=1}(1 - S)/(n+ + 1) + 1/2 sum_{Y=0} S/(n- + 1), pooled over the batch. pred, target (B, N, N)."""
    pos, neg = (target == 1).float(), (target == 0).float()
    return 0.5 * ((1 - pred) * pos).sum() / (pos.sum() + 1) + 0.5 * (pred * neg).sum() / (neg.sum() + 1)


def super_probs(logits, super_of, num_super: int, size):
    """CD-CLIP §4.7: decoder class probabilities summed per super-class (background stays channel 0).
    logits (B, K, h, w) -> (B, Ns+1, H, W), sums to 1 per pixel."""
    p = F.interpolate(logits.float(), size=size, mode="bilinear", align_corners=False).softmax(1)  # (B, K, H, W)
    agg = F.one_hot(super_of, num_super + 1).float()  # (K, Ns+1)
    return torch.einsum("bkhw,ks->bshw", p, agg)


def dice_loss(probs, target, present):
    """Soft Dice per image over the channels present in it (CD-CLIP §4.7): D_k = 2 sum P_k 1[Y=k] /
    (sum P_k + sum 1[Y=k] + 1e-7) over valid pixels (Y != 255, masked correctly [upstream bug fixed]),
    L = 1 - mean_{k present} D_k. probs (B, K, H, W), target (B, H, W), present (B, K) bool -> (B,)."""
    valid = (target != IGNORE)[:, None].float()  # (B, 1, H, W)
    onehot = F.one_hot(target.clamp(max=probs.shape[1] - 1) * (target != IGNORE), probs.shape[1])
    onehot = onehot.permute(0, 3, 1, 2).float() * valid  # (B, K, H, W)
    inter = (probs * onehot).sum((2, 3))
    union = (probs * valid).sum((2, 3)) + onehot.sum((2, 3))
    # D_k = 2 |P_k . Y_k| / (|P_k| + |Y_k|); L_b = 1 - mean_k D_k
    d = 2 * inter / (union + 1e-7)  # (B, K)
    present = present.float()
    return 1 - (d * present).sum(1) / present.sum(1).clamp_min(1)


def predicted_superclasses(logits, labels, super_of, num_super: int, size, floor: float):
    """C_p (CD-CLIP §4.6 [I]): super-classes of the image-label classes that cover >= floor of the pixels of
    the decoder's argmax. logits (B, K, h, w), labels (B, C) -> (B, Ns+1) bool (channel 0 unused)."""
    pred = F.interpolate(logits.detach().float(), size=size, mode="bilinear", align_corners=False).argmax(1)
    K = logits.shape[1]
    area = F.one_hot(pred.flatten(1), K).float().mean(1)  # (B, K) fraction of pixels per class
    hit = (area[:, 1:] >= floor) & (labels > 0)  # (B, C)
    cp = torch.zeros(labels.shape[0], num_super + 1, dtype=torch.bool, device=labels.device)
    b, c = torch.nonzero(hit, as_tuple=True)
    cp[b, super_of[c + 1]] = True
    return cp


def sbe_gate(cp, gate: str):
    """CD-CLIP Table 4: which images receive L_b, from |C_p| (B,) -> (B,) bool."""
    n = cp[:, 1:].sum(1)
    return {"ge2": n >= 2, "eq1": n == 1, "all": torch.ones_like(n, dtype=torch.bool),
            "off": torch.zeros_like(n, dtype=torch.bool)}[gate]


def boundary_loss(logits, Y_s, labels, frozen: Frozen, cfg: Config):
    """CD-CLIP L_b: Dice(P_s, Y_s) on the gated images, averaged over them (0 when none is gated).
    Returns (loss, number of gated images)."""
    size = Y_s.shape[-2:]
    P_s = super_probs(logits, frozen.super_of, frozen.num_super, size)
    present = torch.zeros(labels.shape[0], frozen.num_super + 1, dtype=torch.bool, device=labels.device)
    b, c = torch.nonzero(labels > 0, as_tuple=True)
    present[b, frozen.super_of[c + 1]] = True
    present[:, 0] = True  # {bg} U S_img
    gate = sbe_gate(predicted_superclasses(logits, labels, frozen.super_of, frozen.num_super, size,
                                           cfg.cp_area_floor), cfg.sbe_gate)
    per_image = dice_loss(P_s, Y_s, present)
    if not gate.any():
        return per_image.sum() * 0.0, 0
    return per_image[gate].mean(), int(gate.sum())


# ----------------------------------------------------------------------------------------------------
# Evaluation: bincount confusion matrix -> mIoU table; multi-scale + flip inference; DenseCRF; overlays
# ----------------------------------------------------------------------------------------------------

def confusion_matrix(pred, gt, num_classes: int, ignore_index: int = IGNORE):
    """(K, K) int64 counts, rows = ground truth, columns = prediction; only pixels with 0 <= gt < K count
    (drops ignore_index), as WeCLIP's evaluate.py."""
    gt, pred = gt.flatten().long(), pred.flatten().long()
    valid = (gt >= 0) & (gt < num_classes) & (gt != ignore_index)
    return torch.bincount(gt[valid] * num_classes + pred[valid], minlength=num_classes ** 2).view(
        num_classes, num_classes)


def miou(conf) -> dict:
    """IoU_k = TP / (TP + FP + FN); mIoU over the classes present in the ground truth (row sum > 0), as
    upstream. Also pixel accuracy, mean class accuracy and the confusion ratio FP/TP (mean over classes)."""
    conf = conf.double()
    tp, gt, pr = conf.diag(), conf.sum(1), conf.sum(0)
    iou = tp / (gt + pr - tp).clamp_min(1)
    present = gt > 0
    ratio = (pr - tp) / tp.clamp_min(1)
    return dict(miou=float(iou[present].mean()) if present.any() else float("nan"),
                iou=[float(v) if p else float("nan") for v, p in zip(iou, present)],
                pixel_acc=float(tp.sum() / conf.sum().clamp_min(1)),
                mean_acc=float((tp / gt.clamp_min(1))[present].mean()) if present.any() else float("nan"),
                fp_tp=float(ratio[present].mean()) if present.any() else float("nan"))


def format_table(results: dict, class_names, title: str = "") -> str:
    """Per-class IoU table (only columns with a value), then the summary line."""
    lines = [title] if title else []
    names = [n for n in results]
    width = max(len(c) for c in class_names) + 2
    lines.append("class".ljust(width) + "".join(f"{n:>12}" for n in names))
    for k, c in enumerate(class_names):
        vals = [results[n]["iou"][k] for n in names]
        if all(math.isnan(v) for v in vals):
            continue
        lines.append(c.ljust(width) + "".join("         -  " if math.isnan(v) else f"{100 * v:12.1f}" for v in vals))
    for key, label, scale, digits in (("miou", "mIoU", 100, 1), ("pixel_acc", "pixel acc", 100, 1),
                                      ("fp_tp", "FP/TP", 1, 2)):
        lines.append(label.ljust(width) + "".join(f"{scale * results[n][key]:12.{digits}f}" for n in names))
    return "\n".join(lines)


def resize_long_side(image, long_side: int):
    """(B, 3, H, W) -> long side `long_side` (WeCLIP test: int(h r), int(w r), bilinear, align_corners=False)."""
    H, W = image.shape[-2:]
    r = long_side / max(H, W)
    size = (max(1, int(H * r)), max(1, int(W * r)))
    return image if size == (H, W) else F.interpolate(image, size=size, mode="bilinear", align_corners=False)


def predict_logits(decoder, frozen: Frozen, image, cfg: Config, size=None):
    """Multi-scale + flip test: the long side resized to eval_long_side; at each scale the logits of the
    image and of its un-flipped flip are averaged and resized to the scale-1 token grid; the mean over scales
    is upsampled to `size` (default: the input size). image (1, 3, H, W) -> logits (1, K, H, W)."""
    size = size or image.shape[-2:]
    x0 = resize_long_side(image, cfg.eval_long_side)
    grid = (x0.shape[-2] // frozen.patch, x0.shape[-1] // frozen.patch)
    acc = 0
    for s in cfg.eval_scales:
        x = x0 if s == 1 else F.interpolate(x0, scale_factor=s, mode="bilinear", align_corners=False)
        x = torch.cat([x, x.flip(-1)]) if cfg.eval_flip else x
        out = clip_image_forward(frozen.clip, x)
        logits, _ = decoder(out["feats"], out["grid"])
        logits = (logits[:1] + logits[1:].flip(-1)) / 2 if cfg.eval_flip else logits
        acc = acc + F.interpolate(logits.float(), size=grid, mode="bilinear", align_corners=False)
    return F.interpolate(acc / len(cfg.eval_scales), size=size, mode="bilinear", align_corners=False)


def crf_refine(rgb: np.ndarray, probs: np.ndarray, cfg: Config) -> np.ndarray:
    """DenseCRF with WeCLIP's test parameters. rgb uint8 (H, W, 3), probs (K, H, W) -> labels (H, W)."""
    try:
        import pydensecrf.densecrf as dcrf
        from pydensecrf.utils import unary_from_softmax
    except ImportError:
        raise WSSSError("--crf needs DenseCRF: pip install pydensecrf2==1.1 (builds from source with g++)")
    K, H, W = probs.shape
    d = dcrf.DenseCRF2D(W, H, K)
    d.setUnaryEnergy(unary_from_softmax(probs.astype(np.float32)))
    d.addPairwiseGaussian(sxy=cfg.crf_pos_xy, compat=cfg.crf_pos_w)
    d.addPairwiseBilateral(sxy=cfg.crf_bi_xy, srgb=cfg.crf_bi_rgb, rgbim=np.ascontiguousarray(rgb),
                           compat=cfg.crf_bi_w)
    return np.argmax(np.array(d.inference(cfg.crf_iters)), 0).reshape(H, W)


def palette(k: int) -> np.ndarray:
    """The PASCAL VOC colour map (bit-interleaved), (k, 3) uint8; 255 -> white."""
    pal = np.zeros((256, 3), np.uint8)
    for i in range(256):
        c, r, g, b = i, 0, 0, 0
        for j in range(8):
            r, g, b = r | ((c >> 0) & 1) << (7 - j), g | ((c >> 1) & 1) << (7 - j), b | ((c >> 2) & 1) << (7 - j)
            c >>= 3
        pal[i] = (r, g, b)
    pal[IGNORE] = 255
    return pal


def save_overlay(path, rgb, cam, pseudo, pred, gt):
    """One PNG: image | CAM heat-map | pseudo-label | prediction | ground truth (labels blended on the image)."""
    from PIL import Image
    pal = palette(256)
    heat = np.stack([cam, 1 - np.abs(2 * cam - 1), 1 - cam], -1) * 255  # blue -> green -> red
    panels = [rgb, (0.5 * rgb + 0.5 * heat)]
    panels += [np.where((lab == 0)[..., None], rgb * 0.6, 0.4 * rgb + 0.6 * pal[lab]) for lab in (pseudo, pred, gt)]
    Image.fromarray(np.concatenate([np.asarray(p).astype(np.uint8) for p in panels], 1)).save(path)


def shard(n: int):
    rank, world, _ = dist_info()
    return range(rank, n, world)


def all_reduce_sum(t):
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.all_reduce(t)
    return t


def evaluate(decoder, frozen: Frozen, dataset: SegDataset, cfg: Config, device, cams: bool = False) -> dict:
    """mIoU of the decoder's multi-scale+flip prediction on a split (optionally DenseCRF; skipped when decoder
    is None), and with `cams` of the label-driven pseudo-labels of the same images (raw CAM, refined, after
    PAR: the papers' "M" column; with a decoder, RFM runs dynamic, as upstream's val mode). Also writes
    overlays with --save-vis. Shards over DDP ranks and sums the confusion matrices."""
    K = len(DATASETS[cfg.dataset]["classes"])
    names = (["decoder"] if decoder is not None else []) + (["cam", "refined", "refined+PAR"] if cams else [])
    conf = {n: torch.zeros(K, K, dtype=torch.long, device=device) for n in names}
    if decoder is not None:  # upstream's validate() never called eval(): Dropout2d stayed on [upstream bug fixed]
        decoder.eval()
    vis_dir = Path(cfg.save_vis) if cfg.save_vis else None
    for i in shard(min(len(dataset), cfg.max_images or len(dataset))):
        item = dataset[i]
        image, gt = item["image"][None].to(device), item["mask"].to(device)
        pred = torch.zeros_like(gt)
        if decoder is not None:
            with torch.no_grad():
                logits = predict_logits(decoder, frozen, image, cfg)
            if cfg.crf:
                rgb = denormalize_image(item["image"], cfg.norm)
                pred = torch.from_numpy(crf_refine(rgb, logits[0].softmax(0).cpu().numpy(), cfg)).to(device)
            else:
                pred = logits[0].argmax(0)
            conf["decoder"] += confusion_matrix(pred, gt, K)
        want_vis = vis_dir is not None and i < cfg.num_vis
        if cams or want_vis:
            has_fg = bool(item["label"].any())  # no foreground: the pseudo-label is all background
            pl = label_variants(frozen, image, item["label"][None].to(device), cfg, decoder) if has_fg else {}
            for name in names:
                if name != "decoder":
                    conf[name] += confusion_matrix(pl[name][0] if has_fg else torch.zeros_like(gt), gt, K)
            if want_vis:
                vis_dir.mkdir(parents=True, exist_ok=True)
                cam = pl["cam_map"][0].cpu().numpy() if has_fg else np.zeros(gt.shape)
                pseudo = pl["refined+PAR"][0] if has_fg else torch.zeros_like(gt)
                planes = [t.cpu().numpy().astype(np.uint8) for t in (pseudo, pred, gt)]
                save_overlay(vis_dir / f"{item['name'].replace('/', '_')}.png",
                             denormalize_image(item["image"], cfg.norm), cam, *planes)
    if decoder is not None:
        decoder.train()
    return {name: miou(all_reduce_sum(c)) for name, c in conf.items()}


def label_variants(frozen: Frozen, image, labels, cfg: Config, decoder=None) -> dict:
    """Pseudo-labels of one full image at its GT size, from the image-level labels: raw GradCAM, after the
    method's refinement, after PAR (the last is what training uses); plus a CAM heat-map for overlays.
    With a decoder, RFM runs in its dynamic mode with the decoder affinity (upstream's val mode)."""
    size = image.shape[-2:]
    x = resize_long_side(image, cfg.eval_long_side)
    with torch.no_grad():
        out = clip_image_forward(frozen.clip, x, attn_blocks_needed(cfg, frozen.num_blocks))
        S = decoder(out["feats"], out["grid"])[1] if decoder is not None else None
    res = make_pseudo_labels(frozen, out, x, labels, cfg, S=S, dynamic=decoder is not None, with_super=False,
                             size=size, keep_cams=True)
    rows, c = res["rows"], ~res["rows"]["is_super"]
    img, cls = rows["img"][c], rows["cls"][c]
    heat = F.interpolate(minmax(res["refined"]).amax(0)[None, None], size=size, mode="bilinear",
                         align_corners=False)[0]  # (1, H, W)
    return {"cam": cams_to_label(res["cams"][c], img, cls, x, cfg, use_par=False, size=size),
            "refined": cams_to_label(res["refined"], img, cls, x, cfg, use_par=False, size=size),
            "refined+PAR": res["Y"], "cam_map": heat}


# ----------------------------------------------------------------------------------------------------
# Training: lr schedule, checkpoint dict, the train loop (algorithm zone / diagnostics zone)
# ----------------------------------------------------------------------------------------------------

def lr_at(step: int, cfg: Config) -> float:
    """WeCLIP's schedule at 0-based step k: linear warm-up from warmup_ratio over warmup_steps, then poly:
    lr (1 - k/max_steps)^poly_power. cfg.lr is the *effective* decoder lr (upstream: 2e-4 with a x10 group)."""
    if step < cfg.warmup_steps:
        return cfg.lr * (1 - (1 - step / cfg.warmup_steps) * (1 - cfg.warmup_ratio))
    return cfg.lr * (1 - step / cfg.max_steps) ** cfg.poly_power


def rng_state() -> dict:
    state = dict(torch=torch.get_rng_state(), numpy=np.random.get_state(), python=random.getstate())
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict):
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(path, decoder, optimizer, scaler, step: int, cfg: Config, best: float):
    """One dict: unwrapped decoder (no `module.` prefix), optimizer, scaler, step, config, RNG states."""
    atomic_save(dict(decoder=decoder.state_dict(), optimizer=optimizer.state_dict(),
                     scaler=scaler.state_dict() if scaler else None, step=step, config=dataclasses.asdict(cfg),
                     best_miou=best, rng=rng_state(), version=1), path)


def load_checkpoint(path, cfg: Config, keys=MODEL_KEYS) -> dict:
    """Load a checkpoint and refuse one whose config differs in `keys` (MODEL_KEYS or RESUME_KEYS)."""
    if not Path(path).is_file():
        raise WSSSError(f"checkpoint not found: {path}")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:
        raise WSSSError(f"cannot read checkpoint {path}: {type(e).__name__}: {e}")
    if not isinstance(ckpt, dict) or "decoder" not in ckpt:
        raise WSSSError(f"{path} is not a wsss.py checkpoint")
    saved = ckpt.get("config", {})
    diff = [f"{k}={saved.get(k)!r} (now {getattr(cfg, k)!r})" for k in keys if saved.get(k) != getattr(cfg, k)]
    if diff:
        raise WSSSError(f"checkpoint {path} was trained with another config: {', '.join(diff)}")
    return ckpt


def setup_distributed(cfg: Config):
    """DDP when launched by torchrun (WORLD_SIZE > 1): nccl on CUDA, gloo on CPU. Returns the device."""
    rank, world, local = dist_info()
    device = get_device(cfg)
    if world > 1 and not torch.distributed.is_initialized():
        if device.type == "cuda":
            device = torch.device("cuda", local)
            torch.cuda.set_device(device)
        torch.distributed.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return device


def compute_losses(model, frozen: Frozen, images, labels, cfg: Config, step: int):
    """One batch of the algorithm: frozen CLIP pass, decoder, pseudo-labels (no gradient into the decoder),
    L = L_seg + lambda_aff L_aff (WeCLIP) + lambda_b L_b (CD-CLIP). Returns (loss, float parts, labels).
    Under AMP only the decoder runs in reduced precision: the frozen pass and the label path run in fp32 with
    autocast disabled (in bf16 CDA's refined maps collapse to a few dozen levels), as upstream."""
    with fp32(images.device):
        out = clip_image_forward(frozen.clip, images, attn_blocks_needed(cfg, frozen.num_blocks))
    logits, S = model(out["feats"], out["grid"])
    # the label path sees the decoder only through a detached S: pseudo-labels never carry gradient
    dynamic = step >= cfg.rfm_dynamic_after  # WeCLIP counts every forward call, validation too [upstream bug fixed]
    pl = make_pseudo_labels(frozen, out, images, labels, cfg, S=S.detach().float(), dynamic=dynamic)
    loss_seg = balanced_ce_loss(logits.float(), pl["Y"])
    loss, parts = loss_seg, dict(seg=loss_seg.item())
    if cfg.lambda_aff > 0:
        loss_aff = affinity_loss(S.float(), affinity_labels(pl["Y"], out["grid"], cfg.aff_radius))
        loss, parts["aff"] = loss + cfg.lambda_aff * loss_aff, loss_aff.item()
    if cfg.lambda_b > 0:
        loss_b, parts["gated"] = boundary_loss(logits, pl["Y_s"], labels, frozen, cfg)
        loss, parts["b"] = loss + cfg.lambda_b * loss_b, loss_b.item()
    return loss, parts, pl


def train(cfg: Config, frozen: Frozen = None) -> dict:
    """Train the decoder on the method's pseudo-labels; returns the final evaluation results. `frozen` may
    inject pre-built frozen models (the planted-signal test does)."""
    device = setup_distributed(cfg)
    rank, world, _ = dist_info()
    seed_everything(cfg.seed)  # same decoder initialisation on every rank (DDP also broadcasts it)
    if cfg.demo:
        prepare_demo(cfg)
    ctx, amp_dtype = autocast_ctx(cfg, device)
    train_set = SegDataset(cfg, cfg.train_split, train=True)  # data errors first: they are the cheap ones
    val_set = SegDataset(cfg, cfg.val_split, train=False)
    frozen = frozen or Frozen(cfg, device)
    decoder = build_decoder(cfg, frozen).to(device)
    optimizer = torch.optim.AdamW(decoder.parameters(), lr=cfg.lr, betas=(cfg.beta1, cfg.beta2),
                                  weight_decay=cfg.weight_decay)
    scaler = torch.amp.GradScaler("cuda") if amp_dtype == torch.float16 else None
    start, best = 0, float("nan")
    if cfg.resume:
        ckpt = load_checkpoint(cfg.resume, cfg, RESUME_KEYS)
        decoder.load_state_dict(ckpt["decoder"])
        optimizer.load_state_dict(ckpt["optimizer"])
        if scaler and ckpt.get("scaler"):
            scaler.load_state_dict(ckpt["scaler"])
        start, best = ckpt["step"], ckpt.get("best_miou", best)
        set_rng_state(ckpt["rng"])
        print0(f"resumed from {cfg.resume} at step {start}")
    model = decoder if world == 1 else torch.nn.parallel.DistributedDataParallel(
        decoder, device_ids=[device.index] if device.type == "cuda" else None)
    sampler = EpochSampler(len(train_set), cfg.batch_size, cfg.seed, start, rank, world, cfg.overfit_batch)
    loader = torch.utils.data.DataLoader(train_set, batch_sampler=sampler, num_workers=cfg.num_workers,
                                         pin_memory=device.type == "cuda",
                                         generator=torch.Generator().manual_seed(cfg.seed))  # keeps global RNG
    out_dir = Path(cfg.out_dir)
    if rank == 0:
        out_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(json.dumps(dataclasses.asdict(cfg), indent=1, default=str), out_dir / "config.json")
    n_params = sum(p.numel() for p in decoder.parameters())
    print0(f"config: {json.dumps({k: v for k, v in dataclasses.asdict(cfg).items()}, default=str)}")
    weights = cfg.clip_pretrained if not cfg.tiny or _is_path(cfg.clip_pretrained) else "random"
    print0(f"device {device} | amp {amp_dtype} | world {world} | train {len(train_set)} | val {len(val_set)} | "
           f"CLIP {cfg.clip_model if not cfg.tiny else 'toy'} ({weights}) blocks {frozen.num_blocks} | "
           f"DINOv2 {'on' if frozen.dino is not None else 'off'} | trainable params {n_params:,}")
    metrics_path = out_dir / "metrics.jsonl"
    pl_conf = torch.zeros(len(DATASETS[cfg.dataset]["classes"]), len(DATASETS[cfg.dataset]["classes"]),
                          dtype=torch.long, device=device)
    bar = _progress(range(start, cfg.max_steps), disable=rank != 0)
    data, t0, last = iter(loader), time.time(), {}
    for step in bar:
        batch = next(data)
        # ---- algorithm ----
        lr = lr_at(step, cfg)
        for group in optimizer.param_groups:
            group["lr"] = lr
        images = batch["image"].to(device, non_blocking=True)
        labels = batch["label"].to(device, non_blocking=True)
        with ctx:
            loss, parts, pl = compute_losses(model, frozen, images, labels, cfg, step)
        if not torch.isfinite(loss):
            raise WSSSError(f"loss became {loss.item()} at step {step}: lower --lr or check the data")
        optimizer.zero_grad(set_to_none=True)
        if scaler:
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
        else:
            loss.backward()
            optimizer.step()
        # ---- diagnostics ----
        done = step + 1
        pl_conf += confusion_matrix(pl["Y"], batch["mask"].to(device), pl_conf.shape[0])  # crop GT vs pseudo-label
        last = dict(step=done, loss=loss.item(), **parts, lr=lr)
        bar.set_postfix(loss=f"{last['loss']:.3f}", lr=f"{lr:.1e}")
        if done % cfg.log_every == 0 or done == cfg.max_steps:
            ms = 1000 * (time.time() - t0) / (done - start)
            last.update(pseudo_miou=miou(all_reduce_sum(pl_conf))["miou"], ms_per_step=ms)  # since the last log line
            pl_conf.zero_()
            extra = "".join(f" | {k} {last[k]:.3f}" for k in ("aff", "b") if k in last)
            print0(f"step {done:05d}/{cfg.max_steps} | loss {last['loss']:.3f} | seg {last['seg']:.3f}{extra} | "
                   f"pseudo-label mIoU {100 * last['pseudo_miou']:.1f} | lr {lr:.1e} | {ms:.0f} ms")
            if rank == 0:
                with open(metrics_path, "a") as f:
                    f.write(json.dumps(last) + "\n")
        if cfg.eval_every and done % cfg.eval_every == 0 and done < cfg.max_steps:
            res = evaluate(decoder, frozen, val_set, cfg, device)
            best = max(best, res["decoder"]["miou"]) if not math.isnan(best) else res["decoder"]["miou"]
            print0(f"step {done:05d} | val mIoU {100 * res['decoder']['miou']:.1f}")
        if rank == 0 and (done % cfg.save_every == 0 or done == cfg.max_steps):
            save_checkpoint(cfg.ckpt, decoder, optimizer, scaler, done, cfg, best)
            if done % cfg.save_every == 0 and done < cfg.max_steps:
                save_checkpoint(out_dir / f"ckpt-{done:06d}.pt", decoder, optimizer, scaler, done, cfg, best)
    bar.close()
    if cfg.demo and not cfg.save_vis:
        cfg.save_vis = str(out_dir / "vis")
    results = evaluate(decoder, frozen, val_set, cfg, device, cams=cfg.demo)
    if cfg.demo:  # raw CAM | refined | +PAR | decoder, then the two baselines, side by side
        results = {k: results[k] for k in ("cam", "refined", "refined+PAR", "decoder")}
        results.update(demo_baselines(cfg, val_set, device))
    names = DATASETS[cfg.dataset]["classes"]
    print0(format_table(results, names, title=f"{cfg.method} (refine {cfg.refine}) on {cfg.dataset} {cfg.val_split} "
                                              f"({min(len(val_set), cfg.max_images or len(val_set))} images)"))
    if cfg.save_vis:
        print0(f"overlays (image | CAM | pseudo-label | prediction | truth): {cfg.save_vis}/")
    if rank == 0:
        with open(metrics_path, "a") as f:
            f.write(json.dumps(dict(step=cfg.max_steps, val={k: v["miou"] for k, v in results.items()})) + "\n")
    if world > 1:  # verify what DDP promises: every rank ends with the same decoder
        flat = torch.cat([p.detach().flatten() for p in decoder.parameters()])
        gathered = [torch.zeros_like(flat) for _ in range(world)]
        torch.distributed.all_gather(gathered, flat)
        diff = max(float((g - flat).abs().max()) for g in gathered)
        print0(f"DDP: decoder parameters across {world} ranks differ by at most {diff:.3g}")
        torch.distributed.destroy_process_group()
    return dict(results=results, last=last)


def _progress(it, disable=False):
    """tqdm when available and on a terminal; a silent iterator with the same interface otherwise."""
    try:
        from tqdm import tqdm
        return tqdm(it, disable=disable or not sys.stderr.isatty(), dynamic_ncols=True)
    except ImportError:
        class Plain:
            def __init__(self, it): self.it = it
            def __iter__(self): return iter(self.it)
            def set_postfix(self, **kw): pass
            def close(self): pass
        return Plain(it)


# ----------------------------------------------------------------------------------------------------
# The demo's toy CLIP: contrastive pre-training from scratch on the synthetic world (pretrain-toy)
# ----------------------------------------------------------------------------------------------------

def toy_batch(rng: np.random.Generator, n: int, norm: str):
    """n fresh scenes of the synthetic world: normalised images (n, 3, 64, 64), captions, multi-hot (n, C)."""
    scenes = [draw_toy_scene(rng, TOY_CLIP["vision_cfg"]["image_size"]) for _ in range(n)]
    images = torch.stack([normalize_image(s[0], norm) for s in scenes])
    labels = torch.zeros(n, len(TOY_SHAPES))
    for i, s in enumerate(scenes):
        labels[i, [c - 1 for c in s[2]]] = 1
    return images, [s[3] for s in scenes], labels


def zero_shot_map(clip, tokenizer, images, labels, device) -> float:
    """Multi-label zero-shot mAP: each class scored by cos(image, "a picture of a <class>.") (sklearn AP)."""
    from sklearn.metrics import average_precision_score
    texts = encode_texts(clip, tokenizer, SYNTH_CLASSES[1:], "a picture of a {}.", device)
    with torch.no_grad():
        emb = F.normalize(clip.encode_image(images.to(device)).float(), dim=-1)
    scores = (emb @ texts.T).cpu().numpy()
    return float(np.mean([average_precision_score(labels[:, k], scores[:, k]) for k in range(labels.shape[1])]))


def pretrain_toy(cfg: Config, path=None, log=print0) -> dict:
    """Train the toy open_clip.CLIP from scratch with the symmetric InfoNCE loss and a learnable logit scale
    on freshly drawn image-caption pairs (AdamW, 10% warm-up then cosine), a fixed number of steps with a
    fixed seed; report zero-shot mAP on held-out scenes; save the weights atomically to `path`."""
    import open_clip
    device = get_device(cfg)
    path = Path(path or toy_clip_path(cfg))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        clip = open_clip.CLIP(**TOY_CLIP).to(device)
        tokenizer = open_clip.get_tokenizer("ViT-B-16", context_length=TOY_CLIP["text_cfg"]["context_length"])
        opt = torch.optim.AdamW(clip.parameters(), lr=cfg.toy_lr, weight_decay=cfg.toy_weight_decay,
                                betas=(0.9, 0.98))  # CLIP's betas
        warm = max(1, int(cfg.toy_steps * cfg.toy_warmup))
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda k: min(1.0, (k + 1) / warm) * 0.5 * (
            1 + math.cos(math.pi * min(1.0, max(0, k - warm) / max(1, cfg.toy_steps - warm)))))
        rng = np.random.default_rng([cfg.seed, 7])
        held_out = toy_batch(np.random.default_rng([cfg.seed, 8]), 200, cfg.norm)
        map0 = zero_shot_map(clip.eval(), tokenizer, held_out[0], held_out[2], device)
        clip.train()
        t0, losses = time.time(), []
        for k in _progress(range(cfg.toy_steps)):
            images, captions, _ = toy_batch(rng, cfg.toy_batch, cfg.norm)
            img = F.normalize(clip.encode_image(images.to(device)), dim=-1)
            txt = F.normalize(clip.encode_text(tokenizer(captions).to(device)), dim=-1)
            logits = clip.logit_scale.exp() * img @ txt.T  # (n, n): matching pairs on the diagonal
            target = torch.arange(len(captions), device=device)
            loss = (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)) / 2
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            with torch.no_grad():  # CLIP caps its learned temperature at exp(.) = 100
                clip.logit_scale.clamp_(0, math.log(100))
            losses.append(loss.item())
            if (k + 1) % max(1, cfg.toy_steps // 8) == 0:
                log(f"toy CLIP step {k + 1}/{cfg.toy_steps} | InfoNCE {np.mean(losses[-10:]):.3f} | "
                    f"{time.time() - t0:.0f} s")
        clip.eval()
        map1 = zero_shot_map(clip, tokenizer, held_out[0], held_out[2], device)
    atomic_save({"model": clip.state_dict(), "toy_clip": TOY_CLIP, "steps": cfg.toy_steps}, path)
    log(f"toy CLIP: zero-shot mAP {map0:.2f} -> {map1:.2f} on 200 held-out scenes (chance ~0.33) in "
        f"{time.time() - t0:.0f} s; saved {path}")
    return dict(loss_first=float(np.mean(losses[:5])), loss_last=float(np.mean(losses[-5:])), map_before=map0,
                map_after=map1, path=str(path), seconds=time.time() - t0)


def prepare_demo(cfg: Config):
    """--demo assets, made on first use and then reused from cache_dir: the synthetic dataset and the
    pre-trained toy CLIP. Rank 0 makes them; other DDP ranks wait."""
    rank = dist_info()[0]
    root = Path(cfg.data_root)
    if rank == 0:
        if not (root / ".complete").is_file():
            print0(f"demo: writing the synthetic dataset ({cfg.demo_images} train images) to {root}")
            make_synthetic_dataset(root, cfg.demo_images, 64, seed=0)
            atomic_write_text("ok\n", root / ".complete")
        if _is_path(cfg.clip_pretrained) and not Path(cfg.clip_pretrained).is_file():
            print0(f"demo: pre-training the toy CLIP ({cfg.toy_steps} steps; cached for next time)")
            pretrain_toy(cfg, cfg.clip_pretrained)
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()
    print0("demo: CLIP is the toy CLIP pre-trained on the synthetic world" + (
        "; DINOv2 is a tiny random-weight model (so SBE's prototypes carry no real boundary knowledge here)"
        if cfg.lambda_b > 0 else ""))


def demo_baselines(cfg: Config, val_set: SegDataset, device) -> dict:
    """Reference points for the demo table: pseudo-labels (after PAR) of a random-weight toy CLIP, and
    background everywhere."""
    rnd = Frozen(dataclasses.replace(cfg, clip_pretrained="random"), device, need_dino=False)
    res = evaluate(None, rnd, val_set, dataclasses.replace(cfg, save_vis=""), device, cams=True)
    K = len(DATASETS[cfg.dataset]["classes"])
    conf = torch.zeros(K, K, dtype=torch.long, device=device)
    for i in shard(min(len(val_set), cfg.max_images or len(val_set))):
        gt = val_set[i]["mask"].to(device)
        conf += confusion_matrix(torch.zeros_like(gt), gt, K)
    return {"random CLIP": res["refined+PAR"], "all-bg": miou(all_reduce_sum(conf))}


# ----------------------------------------------------------------------------------------------------
# Benchmark: per-stage time of one training step against the frozen encoders' forward pass
# ----------------------------------------------------------------------------------------------------

def bench(cfg: Config) -> dict:
    """Time each stage of a training step on random images of crop_size (the current device, batch_size
    images, 2 classes each), and the peak memory. ratio = whole step / frozen encoders' forward pass."""
    device = get_device(cfg)
    frozen = Frozen(cfg, device)
    decoder = build_decoder(cfg, frozen).to(device)
    optimizer = torch.optim.AdamW(decoder.parameters(), lr=cfg.lr)
    g = torch.Generator().manual_seed(cfg.seed)
    B, s = cfg.batch_size, cfg.crop_size
    images = torch.randn(B, 3, s, s, generator=g).to(device)
    labels = torch.zeros(B, frozen.num_fg, device=device)
    for b in range(B):
        labels[b, torch.randperm(frozen.num_fg, generator=g)[:2]] = 1

    def timed(fn):
        fn()  # warm-up
        times = []
        for _ in range(cfg.bench_repeats):
            if device.type == "cuda":
                torch.cuda.synchronize()
            t = time.perf_counter()
            fn()
            if device.type == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - t)
        return float(np.median(times))

    def frozen_forward():  # the plain forward of all L blocks at this size (no attention maps, no gradients)
        with torch.no_grad():
            x_last = clip_image_forward(frozen.clip, images)["x_last"]
            y, _ = run_block(frozen.clip.visual.transformer.resblocks[-1], x_last, need_attn=False)
            frozen.clip.visual.ln_post(y[:, 1:]).mean(1) @ frozen.clip.visual.proj
            if frozen.dino is not None:
                dino_features(frozen.dino, images, cfg.norm)

    n_attn = attn_blocks_needed(cfg, frozen.num_blocks)
    out = clip_image_forward(frozen.clip, images, n_attn)
    rows = cam_rows(labels, frozen, with_super=cfg.lambda_b > 0)
    cams, attn_last, patch_emb = gradcam(frozen, out, rows)
    attn_all = attn_last[:, None] if out["attn"] is None else torch.cat([out["attn"], attn_last[:, None]], 1)
    c = ~rows["is_super"]

    def refinement():
        A = propagation_matrix(frozen, attn_all, patch_emb, cfg, S=None)
        box = box_mask(cams[c], cfg.box_threshold) if cfg.refine.endswith(("caa", "rfm")) else None
        return refine_cams(cams[c], rows["img"][c], A, box)

    refined = refinement()

    def decoder_fwd_bwd():
        logits, S = decoder(out["feats"], out["grid"])
        (balanced_ce_loss(logits, torch.zeros(B, s, s, dtype=torch.long, device=device)) + S.mean()).backward()

    def step():
        loss, _, _ = compute_losses(decoder, frozen, images, labels, cfg, step=0)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    stages = {f"frozen forward (CLIP{' + DINOv2' if frozen.dino is not None else ''})": frozen_forward,
              f"CLIP blocks 1..L-1, {n_attn} attention maps": lambda: clip_image_forward(frozen.clip, images, n_attn),
              f"GradCAM, {int(rows['img'].numel())} rows in one pass": lambda: gradcam(frozen, out, rows),
              "  (for reference: one pass per row, as upstream)": lambda: [
                  gradcam(frozen, dict(out, x_last=out["x_last"][int(rows["img"][r]):int(rows["img"][r]) + 1]),
                          dict({k: v[r:r + 1] for k, v in rows.items()}, img=rows["img"][:1] * 0))
                  for r in range(len(rows["img"]))],
              f"refinement ({cfg.refine})": refinement}
    if cfg.refine.startswith("cda"):
        texts = frozen.texts[: frozen.num_fg + frozen.num_super]
        stages[f"  of which CDA ({out['attn'].shape[-1]} patches x {texts.shape[0]} texts, batch {B})"] = \
            lambda: cda_affinity(class_distributions(patch_emb, texts), attn_all[:, -1], cfg.cda_tau)
    groups = [(refined, rows["img"][c], rows["cls"][c])]
    if frozen.dino is not None:
        s_rows = rows["is_super"]
        sbe = lambda: cap_prototype_cams(cams[s_rows], rows["img"][s_rows],  # noqa: E731
                                         dino_features(frozen.dino, images, cfg.norm), cfg.cap_threshold)
        stages["SBE (DINOv2 features, CAP, prototype CAMs)"] = sbe
        groups.append((sbe(), rows["img"][s_rows], rows["cls"][s_rows]))
    stages[f"PAR + label assembly ({'Y and Y_s' if len(groups) > 1 else 'Y'})"] = \
        lambda: cams_to_labels(groups, images, cfg)
    stages["decoder forward + backward"] = decoder_fwd_bwd
    stages["whole training step"] = step
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times = {name: timed(fn) for name, fn in stages.items()}
    ref = times[next(iter(stages))]
    ratio = times["whole training step"] / ref  # the reference line is not part of the step
    cda_400 = None
    if True:  # CD-CLIP's CDA at the paper's VOC size: 400 patches x 25 texts, one image
        p = torch.rand(1, 400, 25, generator=g).softmax(-1).to(device)
        a = torch.rand(1, 400, 400, generator=g).to(device)
        cda_400 = timed(lambda: cda_affinity(p, a, cfg.cda_tau))
    if device.type == "cuda":
        peak = f"{torch.cuda.max_memory_allocated() / 2**20:.0f} MiB (CUDA)"
    else:
        import resource
        peak = f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB (process RSS)"
    weights = cfg.clip_pretrained if not cfg.tiny or _is_path(cfg.clip_pretrained) else "random"
    print(f"bench: method {cfg.method} | refine {cfg.refine} | CLIP {'toy' if cfg.tiny else cfg.clip_model} "
          f"({weights}) | batch {B} x {s}x{s} | device {device} | threads {torch.get_num_threads()}")
    for name, t in times.items():
        print(f"  {name:<58} {1000 * t:9.1f} ms")
    print(f"  {'CDA, 400 patches x 25 texts, one image':<58} {1000 * cda_400:9.1f} ms")
    print(f"  peak memory {peak}")
    print(f"  ratio: training step / frozen forward = {ratio:.2f} (target <= 1.5)")
    return dict(times=times, ratio=ratio, cda_400=cda_400, peak=peak)


# ----------------------------------------------------------------------------------------------------
# CLI: train | eval | cams | synth | pretrain-toy | bench  ->  main(argv)
# ----------------------------------------------------------------------------------------------------

def cmd_train(cfg: Config):
    train(cfg)


def cmd_eval(cfg: Config):
    """Checkpoint -> mIoU table of the decoder on val_split (multi-scale + flip, optional CRF, overlays)."""
    device = setup_distributed(cfg)  # under torchrun the images are sharded and the counts summed
    ckpt = load_checkpoint(cfg.ckpt, cfg)
    dataset = SegDataset(cfg, cfg.val_split, train=False)
    frozen = Frozen(cfg, device, need_dino=False)  # inference is decoder only
    decoder = build_decoder(cfg, frozen).to(device)
    decoder.load_state_dict(ckpt["decoder"])
    res = evaluate(decoder, frozen, dataset, cfg, device)
    title = (f"{cfg.ckpt} (step {ckpt['step']}) on {cfg.dataset} {cfg.val_split}, scales {cfg.eval_scales}, "
             f"flip {cfg.eval_flip}, crf {cfg.crf}")
    print0(format_table(res, DATASETS[cfg.dataset]["classes"], title=title))
    if cfg.save_vis:
        print0(f"overlays (image | CAM | pseudo-label | prediction | truth): {cfg.save_vis}/")
    return res


def cmd_cams(cfg: Config):
    """Training-free pseudo-label quality on cam_split: raw GradCAM, after --refine, after PAR."""
    device = setup_distributed(cfg)
    if cfg.demo:
        prepare_demo(cfg)
    dataset = SegDataset(cfg, cfg.cam_split, train=False)
    frozen = Frozen(cfg, device, need_dino=False)
    res = evaluate(None, frozen, dataset, cfg, device, cams=True)
    print0(format_table(res, DATASETS[cfg.dataset]["classes"], title=f"pseudo-labels of {cfg.method} "
                        f"(refine {cfg.refine}) on {cfg.dataset} {cfg.cam_split}"))
    return res


def cmd_synth(cfg: Config):
    if not cfg.data_root:
        raise WSSSError("synth needs --data-root DIR (the folder to write)")
    root = make_synthetic_dataset(cfg.data_root, cfg.num_images, cfg.image_size, cfg.seed)
    print0(f"wrote {cfg.num_images} train + {max(1, cfg.num_images // 4)} val synthetic images to {root} "
           f"(use --dataset synthetic --data-root {root})")


def cmd_pretrain_toy(cfg: Config):
    path = cfg.clip_pretrained if _is_path(cfg.clip_pretrained) else toy_clip_path(cfg)
    return pretrain_toy(cfg, path)


COMMANDS = {"train": cmd_train, "eval": cmd_eval, "cams": cmd_cams, "synth": cmd_synth,
            "pretrain-toy": cmd_pretrain_toy, "bench": bench}


def _one_line(e: Exception) -> str:
    """The user-facing line of an error, also when a DataLoader worker wrapped it in a traceback."""
    lines = [ln for ln in str(e).strip().splitlines() if ln.strip()] or [type(e).__name__]
    return re.sub(r"^[\w.]*WSSSError: ", "", lines[-1].strip())


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(f"usage: wsss.py {{{','.join(COMMANDS)}}} [--flags]   (wsss.py COMMAND --help lists the flags)\n\n"
              + __doc__.split("\n\n")[2])
        return 0
    command = argv.pop(0)
    if command not in COMMANDS:
        print(f"error: unknown command {command!r}; choose one of {', '.join(COMMANDS)}", file=sys.stderr)
        return 2
    try:
        cfg = parse_config(argv, command)
        COMMANDS[command](cfg)
    except WSSSError as e:
        print(f"error: {_one_line(e)}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
