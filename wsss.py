"""wsss.py: a single-file reference implementation of CLIP-based single-stage weakly supervised
semantic segmentation (WSSS): image-level labels -> frozen CLIP -> class activation maps (CAMs) ->
affinity refinement -> pixel pseudo-labels -> a light trained decoder.

Methods (`--method` is the one dial; each preset is a few settings, see METHODS):
  weclip  WeCLIP, "Frozen CLIP: A Strong Backbone for Weakly Supervised Semantic Segmentation",
          Zhang et al., CVPR 2024, arXiv:2406.11189. GradCAM CAMs on frozen CLIP, attention-affinity
          refinement (RFM), pixel-adaptive refinement (PAR), a 3-block transformer decoder.
  cdclip  CD-CLIP, "Leveraging Class Distributions in CLIP for Weakly Supervised Semantic Segmentation",
          CVPR 2026 (no public code; every inferred choice is a setting, tagged [I]). Class-distribution-aware
          affinity (CDA, Jensen-Shannon divergence between the patches' distributions over all class texts) and
          super-class boundary exploration (SBE, DINOv2 prototypes supervising a gated Dice loss).
  excel   ExCEL, "Exploring CLIP's Dense Knowledge for Weakly Supervised Semantic Segmentation", Yang et al.,
          CVPR 2025 (official code zwyang6/ExCEL). Patch-text CAMs by feature surgery on a parameter-free
          calibrated CLIP path (SVC), class texts enriched with clustered attribute sentences (TSE), the
          adapter's relation R biasing that path (LVC, the dynamic CAM) and gating CAA; training-free mode.
  diclip  DiCLIP, "Diffusion Model Enhances CLIP's Dense Knowledge for Weakly Supervised Semantic
          Segmentation", Yang et al., TIP 2026 (no public code; reconstructed, every inferred choice [I]).
          Stable Diffusion self-attention refined by KL k-means clustering (ACR) added to CLIP's attention
          (VCE); a key-value cache built from generated single-class images (TSA) with a trainable adapter.

How to read it. Part I (the methods) comes first, in the order the data flows: configuration -> data -> frozen
encoders -> CAMs -> refinements -> caches -> decoder -> losses -> evaluation -> the training step. Part II (the
harness: command line, files, caches on disk, run folders, DDP, the demo, bench) comes after a banner; nothing in
it changes a pseudo-label. Part I reaches Part II only through a few named functions: load_assets (the models),
read_split, scan_labels, load_rgb, load_mask (the files), custom_dataset_info (the class table of your own data),
ensure_tsa_cache (DiCLIP's cache on disk), agree (DDP).
Reading map, the functions of each method in the order to visit them:
  weclip  METHODS, MethodConfig, augment, SegDataset, Frozen, encode_texts, clip_image_forward, run_block,
          cam_rows, gradcam, rfm_weights, sinkhorn_symmetrize, transition_matrix, box_mask, propagation_matrix,
          refine_cams, par_refine, label_scores, cams_to_labels, make_pseudo_labels, SegDecoder,
          balanced_ce_loss, affinity_labels, affinity_loss, predict_logits, miou, lr_at, compute_losses,
          train_step, train_loop
  cdclip  WeCLIP's path, then gradcam's patch embeddings, class_distributions, js_divergence_matrix,
          cda_affinity, propagation_matrix (refine cda), cap_prototype_cams, dino_features, make_pseudo_labels
          (Y_s), super_probs, predicted_superclasses, sbe_gate, dice_loss, boundary_loss, compute_losses
  excel   METHODS, attention_qkv, svc_attention, run_dual_block, calibrated_tokens, calib_spec,
          clip_image_forward, cluster_attributes, tse_text_embeddings, Frozen (cam_texts), feature_surgery,
          patch_text_cam, caa_maps, box_mask, propagation_matrix, par_refine, make_pseudo_labels, SegDecoder
          (relation cos), lvc_relation, lvc_bias, compute_losses (the dynamic CAM), label_variants
  diclip  METHODS, sd_self_attention, SDAttentionCapture, kl_kmeans, acr_reliable, acr_refine, vce_attention,
          vce_fusion, run_dual_block, frozen_pass, patch_text_cam, tsa_label_fns, pool_cache_features,
          mask_average_pool, build_kv_cache, cache_activation, static_cache_cam, static_cache_fusion,
          CacheAdapter, dynamic_cam, make_pseudo_labels (Y, Y_st), head_outputs, compute_losses (L_dyn)

Notation used in shape comments: B batch, R rows of a batched GradCAM (one per (image, class) pair),
K classes incl. background, C foreground classes, T texts, D feature width, E joint embedding width,
h,w patch grid, N = h*w patches, H,W image, L CLIP blocks.

Faithfulness: numerics follow the official WeCLIP and ExCEL code where it produced the published numbers;
`[code≠paper]` marks where that code (for CD-CLIP and DiCLIP, ours) departs from the paper, `[upstream bug
fixed]` where we fixed a bug of the official code, and `[I]` a choice inferred because the paper does not give
it (DiCLIP also tags [T] paper, [L] training logs). The commands are in README.md and `python wsss.py --help`.
"""
from __future__ import annotations

import argparse
import dataclasses
import enum
import hashlib
import importlib
import importlib.util
import inspect
import json
import math
import os
import random
import re
import shlex
import signal
import socket
import sys
import threading
import time
import warnings
from contextlib import nullcontext
from dataclasses import dataclass, fields
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F


class WSSSError(Exception):
    """A user-facing error: main() prints its message as one line and exits with status 2."""


# ====================================================================================================
# PART I: THE METHODS. Configuration -> data -> frozen encoders -> CAMs -> refinements -> caches -> decoder ->
# losses -> evaluation -> the training step. Each method's blocks are labelled with its paper and equations.
# ====================================================================================================
# ----------------------------------------------------------------------------------------------------
# I.1 Configuration: class tables, super-classes, datasets, method presets, the methods' settings
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

# The synthetic world (see `draw_toy_scene`): each object is a large body, of a colour that no class owns, carrying
# its class's badge (a shape in the class colour) at its rim; the badge alone tells the class.
TOY_SHAPES = [("red", "circle"), ("blue", "square"), ("green", "triangle"), ("yellow", "star"),
              ("purple", "ring"), ("orange", "cross")]
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
                attr_ratio=112 / 400, mask_strip="",
                defaults=dict(train_split="train_aug", val_split="val", superclasses=5)),
    "coco": dict(classes=COCO_CLASSES, prompts=COCO_PROMPTS, bg_prompts=COCO_BG, superclasses=COCO_SUPER,
                 attr_ratio=224 / 1600,  # ExCEL's sentences per attribute cluster (TSE)
                 # COCO in VOC-style layout: list entries "train/COCO_train2014_<id>", masks "train/<id>.png"
                 mask_strip=r"COCO_(?:train|val)2014_",
                 defaults=dict(train_split="train", val_split="val", max_steps=80000, superclasses=12,
                               box_threshold=0.7, rfm_dynamic_after=40000, rfm_dynamic_layers=10, eval_every=0,
                               cache_per_class=5)),
    "synthetic": dict(classes=SYNTH_CLASSES, prompts=SYNTH_CLASSES[1:],
                      bg_prompts=["grey noise", "texture", "empty background", "grain", "speckles"],
                      superclasses=SYNTH_SUPER, mask_strip="",
                      defaults=dict(train_split="train", val_split="val", superclasses=3, crop_size=64,
                                    eval_long_side=64)),
}


def dataset_info(cfg) -> dict:
    """The class table of cfg's dataset (classes with background first, prompts, background words, super-class
    tables, presets): DATASETS for voc, coco and synthetic; for `--dataset custom` the files in --data-root
    (classes.txt, background.txt, superclasses.txt: read by Part II's custom_dataset_info, see data.md)."""
    return custom_dataset_info(cfg.data_root) if cfg.dataset == "custom" else DATASETS[cfg.dataset]


METHODS = {
    # WeCLIP: GradCAM -> RFM (static, then dynamic with the decoder affinity) -> PAR; L = L_seg + 0.1 L_aff.
    "weclip": dict(refine="rfm", lambda_aff=0.1, lambda_b=0.0, eval_scales=(1.0, 0.75)),
    # CD-CLIP: GradCAM -> CDA (no box, no RFM: Table 3 row #3) -> PAR; L = L_seg + 0.6 L_b (SBE, gated).
    "cdclip": dict(refine="cda", lambda_aff=0.0, lambda_b=0.6, sbe_gate="ge2", eval_scales=(1.0, 1.5)),
    # ExCEL: TSE texts x SVC tokens -> patch-text CAM (static; dynamic with LVC after 14k) -> CAA (the box-masked
    # Sinkhorn propagation; after 14k WeCLIP's layer selection gated by sigmoid(R): refine "rfm") -> PAR;
    # L = L_seg + 0.1 L_div. All trained parameters at lr 1e-3 (the only populated x10 group) [code≠paper].
    "excel": dict(cam="text", refine="rfm", attn_layers=6, rfm_dynamic_layers=6, rfm_dynamic_after=14000,
                  box_threshold=0.79, val_box_threshold=0.75, lvc=True, relation="cos", lambda_aff=0.1,
                  seg_one_kind="half",  # losses.py: 0.5 (bg_mean + fg_mean) with +1e-6 counts [code]
                  aff_self_after=24000, lambda_b=0.0, lr=1e-3, warmup_steps=50, max_steps=30000, seed=0,
                  eval_resize="square", eval_long_side=320, eval_scales=(0.7, 1.0, 1.2, 1.5), eval_flip_at_1=False,
                  crf_pos_xy=1.0, crf_pos_w=3.0, crf_bi_xy=67.0, crf_bi_rgb=3.0, crf_bi_w=4.0,
                  coco=dict(box_threshold=0.88, rfm_dynamic_after=30000, aff_self_after=0, max_steps=100000,
                            warmup_steps=200, eval_flip_at_1=True),
                  synthetic=dict(eval_long_side=64)),  # the 64 px world is tested at its own size
    # DiCLIP (no public code; run from ExCEL's code base): ACR-refined SD attention added to the standard q-k map
    # of the last 3 calibrated blocks (VCE) -> patch-text CAM M_p; TSA cache: M_st = M_p + 0.5 N(static
    # retrieval) -> Y_st trains the adapter (L_dyn), M_dt = M_p + 0.5 N(adapter) -> Y_dt trains the decoder on the
    # RAW CLIP features; CAA + PAR as ExCEL. Schedule from the logs [L]; VOC: gating at 47 % of training and the
    # self-target switch at 80 %, ExCEL's VOC proportions [I]; COCO: ExCEL's COCO values below [I].
    # lr: decoder 2e-3 (2e-4 x10 group), adapter 2e-4 [I].
    "diclip": dict(cam="text", svc_attn="qk", svc_heads="sum", tse="off", lvc=False, vce=True, tsa="dynamic",
                   relation="cos", refine="rfm", attn_layers=6, rfm_dynamic_layers=6, rfm_dynamic_after=9300,
                   box_threshold=0.79, val_box_threshold=0.75, lambda_aff=0.1, aff_self_after=16000, lambda_b=0.0,
                   seg_one_kind="half",  # ExCEL's L_seg (DiCLIP runs from its code base) [I]
                   lr=2e-3, adapter_lr=2e-4, warmup_steps=50, max_steps=20000, seed=0, eval_resize="square",
                   eval_long_side=320, eval_scales=(0.7, 1.0, 1.2, 1.5), eval_flip_at_1=True,
                   crf_pos_xy=1.0, crf_pos_w=3.0, crf_bi_xy=67.0, crf_bi_rgb=3.0, crf_bi_w=4.0,
                   # COCO: ExCEL's COCO gating step (30k of 100k) and CAA box threshold (0.88): DiCLIP runs from
                   # ExCEL's code base and its COCO values are lost [I]
                   coco=dict(max_steps=100000, lr=1e-3, adapter_lr=1e-4, warmup_steps=200, rfm_dynamic_after=30000,
                             box_threshold=0.88, aff_self_after=0, cache_per_class=5),
                   # the synthetic world: cache images from its renderer (a labelled stand-in for SD generation),
                   # SD's attention pass at the images' own 64 px, a cache sized to 6 classes x 10 images [I]
                   synthetic=dict(cache_source="synthetic", cache_images_per_class=10, cache_image_size=64,
                                  sd_size=64, cache_per_class=4, cache_bg=8, eval_long_side=64)),
}
# --upstream: the official code's numerics where this file fixed a bug ([upstream bug fixed] in the code), per
# method; explicit flags still win. Not restorable: WeCLIP's NaN L_seg on a batch without foreground (a NaN step),
# ExCEL's K_r = 1 / B = 10 NaN texts (upstream masks every score when it drops 0: k = 0 keeps all here too).
UPSTREAM = {
    # WeCLIP: boxes end one row/column early; the dynamic-RFM counter also counted validation forwards, so on VOC
    # (val every 2k steps) it switched at step 9,145 instead of 15,001; Dropout2d stays on in validation
    "weclip": dict(box_exclusive_edge=True, voc=dict(rfm_dynamic_after=9145)),
    "cdclip": dict(),  # CDA has no box; its L_b masking matters only where Y_s has ignore pixels (it has none)
    # ExCEL: the box edge; TSE's dropped count by float truncation (B = 20 drops 1, not 2); the decoder/adapter
    # reads the aliased all_feats of the in-place += (adapter_feats); Dropout2d stays on in validation
    "excel": dict(box_exclusive_edge=True, tse_drop="upstream", adapter_feats="upstream"),
    "diclip": dict(box_exclusive_edge=True, adapter_feats="upstream"),  # ExCEL's code base [I]
}
REFINE_MODES = ("none", "caa", "rfm", "cda", "cda+caa", "cda+rfm")
ACR_VARIANTS = ("left", "recluster", "right", "sharpen")  # DiCLIP §III-C.2, Eq. 6 readings
VCE_FUSIONS = ("add", "norm", "scale", "gate")  # DiCLIP Table XII: SD attention into CLIP attention

# DiCLIP §III-D's prompt for the single-class images of the TSA cache ({category}: the plain class name).
DICLIP_PROMPT = ("a realistic photograph of a fully visible, entire {category} with natural colors, centered in the "
                 "image, with a clear and distinct background, high color contrast, and the {category} not occupying "
                 "the entire frame, ensuring it is completely visible without cropping.")


class Affects(enum.Flag):
    """What a setting can change. Checkpoints, --resume and DiCLIP's cache compare exactly the settings that
    affect what they hold (Part II derives the sets from these tags: see fields_affecting)."""
    NOTHING = 0
    LABELS = enum.auto()  # a pseudo-label, or what DiCLIP's cache stores: the label path
    IMAGES = enum.auto()  # DiCLIP's generated cache images
    MODEL = enum.auto()   # the shape of the trained modules (a checkpoint of another shape cannot load)
    RUN = enum.auto()     # the result of a training run (schedule, losses, optimiser, data order)


LABELS, IMAGES, MODEL, RUN = Affects.LABELS, Affects.IMAGES, Affects.MODEL, Affects.RUN


def setting(default, affects: Affects = Affects.NOTHING):
    """A Config field with its default and what it affects (its help text is the comment after it)."""
    return dataclasses.field(default=default, metadata=dict(affects=affects))


@dataclass
class MethodConfig:
    """Every setting of the four methods (defaults: paper or official code; presets: DATASETS, METHODS). Part II's
    Config adds the harness's; the command line is generated from both (`--crop-size 448` sets crop_size)."""
    # --- run ---
    method: str = setting("weclip", RUN)  # one of METHODS: weclip | cdclip | excel | diclip
    dataset: str = setting("voc", LABELS | IMAGES | MODEL)  # voc | coco | synthetic | custom (your own: data.md)
    train_split: str = setting("train_aug", RUN)  # split list for training (dataset preset)
    val_split: str = "val"              # split list for evaluation
    seed: int = setting(1, LABELS | RUN)  # seeds python, numpy and torch (WeCLIP setup_seed(1))
    # --- frozen backbones ---
    clip_model: str = setting("ViT-B-16", LABELS | MODEL)  # open_clip architecture name
    clip_pretrained: str = setting("openai", LABELS)  # open_clip tag, a local checkpoint path, or "random"
    dino_model: str = setting("facebook/dinov2-base", LABELS)  # DINOv2 (CD-CLIP's ViT-B/14): id, folder or "random"
    template: str = setting("a clean origami {}.", LABELS)  # WeCLIP's prompt ("clear" in the paper [code≠paper])
    # --- data ---
    crop_size: int = setting(320, LABELS | RUN)  # training crop (WeCLIP 320 -> 20x20 tokens)
    scale_min: float = setting(0.5, RUN)  # random rescale range (WeCLIP U(0.5, 2.0))
    scale_max: float = setting(2.0, RUN)  # upper end of the random rescale range
    norm: str = setting("imagenet", LABELS)  # pixel statistics fed to CLIP: imagenet (code [code≠paper]) | clip
    # --- CAMs (WeCLIP) ---
    cam_logit_scale: float = setting(100.0, LABELS)  # GradCAM softmax scale (OpenAI CLIP's 100); 0: the model's own
    bg_pow: float = setting(1.0, LABELS)  # background score (1 - max_c CAM)^bg_pow (WeCLIP cam_bg_thres = 1)
    cam_contrast_floor: float = setting(0.0, LABELS)  # [I] guard: min-max a refined CAM by >= this share of its peak
    # --- refinement ---
    refine: str = setting("rfm", LABELS)  # none | caa | rfm | cda | cda+caa | cda+rfm (CD-CLIP Table 3 rows)
    attn_layers: int = setting(8, LABELS)  # static affinity: mean attention of the last n blocks (WeCLIP 8)
    rfm_dynamic_layers: int = setting(6, LABELS)  # dynamic RFM: candidate blocks, the last n (VOC 6, COCO 10)
    rfm_dynamic_after: int = setting(15000, LABELS)  # dynamic RFM from this training step ([upstream bug fixed])
    power: int = setting(2, LABELS)     # t: refined CAM = A^t m (WeCLIP squares the transition matrix)
    box_threshold: float = setting(0.4, LABELS)  # box mask threshold theta (VOC 0.4, COCO 0.7)
    box_exclusive_edge: bool = setting(False, LABELS)  # upstream's box quirk (last token row/col never boxed)
    upstream: bool = setting(False, LABELS | RUN)  # restore every [upstream bug fixed] of the method (UPSTREAM table)
    # --- CDA (CD-CLIP) ---
    cda_tau: float = setting(0.002, LABELS)  # tau in W = softmax(-D_JS / tau) [I]
    cda_minmax: str = setting("patch", LABELS)  # min-max of S_a per text over patches (patch) | per patch (text) [I]
    cda_bg_texts: bool = setting(False, LABELS)  # add background words to T_all (an ablation [I])
    # --- PAR (WeCLIP PAR.py) ---
    par_iters: int = setting(20, LABELS)  # PAR propagation iterations
    par_dilations: tuple = setting((1, 2, 4, 8, 12, 24), LABELS)  # PAR neighbourhood dilations (8 neighbours each)
    par_w1: float = setting(0.3, LABELS)  # image-term temperature
    par_w2: float = setting(0.01, LABELS)  # weight of the positional term (weights sum to 1 + w2, as upstream)
    # --- ExCEL: patch-text CAMs on a calibrated CLIP path, TSE, SVC, LVC ---
    cam: str = setting("gradcam", LABELS | MODEL)  # CAM source: gradcam (WeCLIP, CD-CLIP) | text (ExCEL, DiCLIP)
    cam_sim: str = setting("surgery", LABELS)  # patch-text similarity: surgery (code) | cosine (paper) [code≠paper]
    svc_layers: int = setting(5, LABELS)  # calibrated (SVC) blocks: the last n (ExCEL 5: 0-indexed 7..11)
    svc_attn: str = setting("intra", LABELS)  # calibrated map: intra (qq, kk, vv softmaxes; ExCEL) | qk (DiCLIP)
    svc_heads: str = setting("sum", LABELS)  # calibrated map's heads: sum (code: rows sum to H) | mean [code≠paper]
    svc_norm: str = setting("tokens", LABELS)  # L2 norm: tokens (code: per channel over tokens) | channels [code≠paper]
    caa_attn_mix: str = setting("upstream", LABELS)  # CAA maps: upstream (1 head-mean + 5 head-sum blocks) | mean
    tse: str = setting("on", LABELS)  # TSE: on (ExCEL's bank/descriptions) | builtin (own sentences) | off ("Global")
    tse_keep: float = setting(0.9, LABELS)  # K_r: share of the attribute centroids kept per class (0.9: top 90 percent)
    tse_lambda: float = setting(1.0, LABELS)  # lambda: weight of the attribute sum (ExCEL hard-codes 1)
    tse_clusters: int = setting(0, LABELS)  # B attribute centroids (VOC 112, COCO 224); 0: ExCEL's sentences/B ratio
    tse_drop: str = setting("exact", LABELS)  # TSE's dropped count: exact floor | upstream (float truncation)
    adapter_feats: str = setting("clean", LABELS | RUN)  # decoder inputs: clean | upstream (ExCEL's in-place += mix)
    lvc: bool = setting(False, LABELS)  # LVC: the adapter's softmax(R) biases the calibrated path (the dynamic CAM)
    relation: str = setting("dot", LABELS | MODEL)  # decoder affinity S: dot (WeCLIP sigmoid(F^T F)) | cos (ExCEL R)
    lvc_alpha: float = setting(3.0, LABELS | MODEL)  # alpha in R = alpha (cos(F_d) - beta mean cos(F_d))
    lvc_beta: float = setting(1.0, LABELS | MODEL)  # beta in R = alpha (cos(F_d) - beta mean cos(F_d))
    lvc_mean: str = setting("batch", LABELS | MODEL)  # the mean in R: batch (code: one scalar per batch) | image
    aff_self_after: int = setting(0, RUN)  # affinity-loss targets from the model's own argmax from this step (0 never)
    val_box_threshold: float = setting(0.0, LABELS)  # box threshold of validation pseudo-labels; 0: box_threshold
    # --- SBE (CD-CLIP) ---
    superclasses: int = setting(5, LABELS)  # which super-class table (VOC 4|5|7, COCO 12, synthetic 3)
    sbe_refine: bool = setting(False, LABELS)  # also refine the super-class CAMs with the method's A^t before CAP [I]
    cap_threshold: float = setting(0.5, LABELS)  # theta_cap: CAP keeps super-class CAM values >= this [I]
    cp_area_floor: float = setting(0.001, RUN)  # a class is "predicted" if it covers >= this fraction of pixels [I]
    sbe_gate: str = setting("ge2", RUN)  # apply L_b when |C_p| >= 2 (ge2), == 1 (eq1), always (all), never (off)
    lambda_b: float = setting(0.0, RUN)  # weight of the boundary Dice loss L_b (CD-CLIP 0.6)
    # --- DiCLIP ---
    sd_model: str = setting("stabilityai/stable-diffusion-2-1-base", LABELS | IMAGES)  # SD: id or folder [T; I: base]
    sd_size: int = setting(512, LABELS)  # SD input side for the attention pass; a multiple of the VAE x UNet factor [I]
    sd_timestep: int = setting(100, LABELS)  # noising step t of the single UNet pass (DiffSegmenter) [I]
    sd_layers: str = setting("up", LABELS)  # SD attn1 layers: up (all up-block attn1) | comma list of prefixes [I]
    acr_k: int = setting(9, LABELS)     # ACR: KL k-means clusters K (Eq. 4) [T]
    acr_delta: float = setting(5e-4, LABELS)  # ACR: reliability threshold delta on A_sd (Eq. 6) [T]
    acr_rounds: int = setting(3, LABELS)  # ACR: refinement rounds T (Eq. 6; 0 = ACR off) [T]
    acr_variant: str = setting("left", LABELS)  # ACR Eq. 6 reading: left | recluster | right | sharpen [I]
    acr_iters: int = setting(10, LABELS)  # ACR: Lloyd iterations of the KL k-means [I]
    vce_layers: int = setting(3, LABELS)  # VCE: calibrated last L CLIP blocks (Eq. 7) [T]
    vce_weight: float = setting(1.0, LABELS)  # VCE: weight w of A_acr added to CLIP's attention (Eq. 7) [T]
    vce_fusion: str = setting("add", LABELS)  # VCE: SD-into-CLIP fusion (Table XII): add | norm | scale | gate [T]
    cache_beta: float = setting(1.0, LABELS)  # TSA: sharpness beta of phi(x) = exp(-beta (1 - x)) (Eq. 2) [I]
    cache_alpha: float = setting(0.5, LABELS)  # TSA: cache weight alpha in M_st / M_dt (Eqs. 11, 13) [T]
    cache_negative: bool = setting(True, LABELS)  # TSA: the background (negative) cache refines M_f (Table IV) [T]
    cache_per_class: int = setting(10, LABELS | MODEL)  # TSA: foreground keys K_c per class (VOC 10, COCO 5) [T, L]
    cache_bg: int = setting(20, LABELS | MODEL)  # TSA: background keys K_bg (one K-means over all images) [T*]
    cache_prompts: int = setting(92, MODEL)  # TSA: learnable key/value prompts of the adapter (Eq. 12) [T]
    cache_images_per_class: int = setting(50, LABELS)  # TSA: generated single-class images per class [T*]
    cache_steps: int = setting(50, IMAGES)  # TSA: SD sampling steps per generated image [I]
    cache_guidance: float = setting(7.5, IMAGES)  # TSA: classifier-free guidance scale of the generation [I]
    cache_image_size: int = setting(512, IMAGES)  # TSA: generated image side [I]
    cache_prompt: str = setting(DICLIP_PROMPT, IMAGES)  # TSA: generation prompt, {category} = class name [T]
    cache_scheduler: str = setting("model", IMAGES)  # TSA: sampler: model (the checkpoint's own [I]) | ddim
    cache_dyn_softmax: bool = setting(True, LABELS)  # TSA: Eq. 13 uses softmax(Z)'s fg part (else fg logits) [I]
    lambda_dyn: float = setting(0.1, RUN)  # weight of the adapter loss L_dyn (Eq. 15) [T]
    vce: bool = setting(False, LABELS)  # VCE: ACR-refined SD self-attention added in the calibrated path (Eq. 7)
    tsa: str = setting("off", LABELS | MODEL)  # TSA cache: off | static (M_st, Eq. 11) | dynamic (Eqs. 12-13)
    adapter_lr: float = setting(0.0, RUN)  # lr of the cache adapter; 0: --lr (DiCLIP 2e-4 vs decoder 2e-3 [I])
    # --- decoder (WeCLIP) ---
    dec_dim: int = setting(256, MODEL)  # decoder width (fuse MLPs and transformer)
    dec_layers: int = setting(3, MODEL)  # decoder transformer blocks
    dec_heads: int = setting(8, MODEL)  # decoder attention heads
    dec_mlp: int = setting(1024, MODEL)  # decoder MLP hidden width (QuickGELU)
    dec_dropout: float = setting(0.1, RUN)  # Dropout2d after the fuse conv
    # --- losses ---
    seg_one_kind: str = setting("mean", RUN)  # L_seg on a batch of bg-only/fg-only pixels: mean (1x) | half (ExCEL)
    lambda_aff: float = setting(0.1, RUN)  # weight of the affinity loss (WeCLIP 0.1)
    aff_radius: int = setting(8, RUN)   # affinity-label window (Chebyshev, token grid)
    # --- optimisation (WeCLIP) ---
    # cdclip keeps it [I]: CD-CLIP's stated 2e-5 would be 100x below the decoder lr that reproduces WeCLIP
    lr: float = setting(2e-3, RUN)      # effective decoder lr (code: 2e-4 x10 group [code≠paper on its face])
    weight_decay: float = setting(0.01, RUN)  # AdamW weight decay
    beta1: float = setting(0.9, RUN)    # AdamW beta1
    beta2: float = setting(0.999, RUN)  # AdamW beta2
    warmup_steps: int = setting(50, RUN)  # linear warm-up steps
    warmup_ratio: float = setting(1e-6, RUN)  # warm-up starts at lr * this
    poly_power: float = setting(1.0, RUN)  # poly decay power after warm-up
    batch_size: int = setting(4, RUN)   # per process (COCO too; CD-CLIP's COCO batch is 8 [code≠paper])
    max_steps: int = setting(30000, RUN)  # training steps (VOC 30k, COCO 80k); --resume may raise it
    # --- evaluation ---
    eval_long_side: int = 512           # test images are resized so the long side is this
    eval_scales: tuple = (1.0, 0.75)    # multi-scale test (WeCLIP 1, 0.75; CD-CLIP 1, 1.5)
    eval_flip: bool = True              # average each scale with its horizontal flip
    eval_flip_at_1: bool = True         # ... also at scale 1 (ExCEL's VOC script uses the un-flipped logits there)
    eval_resize: str = "long"           # test resize: long (long side eval_long_side, WeCLIP) | square (ExCEL: 320 s)


# ----------------------------------------------------------------------------------------------------
# I.2 Shared helpers: seeding, float32 regions, min-max, rank-0 printing
# ----------------------------------------------------------------------------------------------------

def seed_everything(seed: int):
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def fp32(device):
    """A region that runs in float32 even inside a training autocast: the frozen encoders and the whole label
    path (CAMs, affinities, refinements, PAR). Only the trained head uses AMP."""
    return torch.autocast(torch.device(device).type, enabled=False)


def minmax(x, dims=(-2, -1), eps: float = 1e-7):
    """Per-map min-max to [0, 1): (x - min) / (eps + max(x - min)), as pytorch_grad_cam's scale_cam_image."""
    x = x - x.amin(dim=dims, keepdim=True)
    return x / (eps + x.amax(dim=dims, keepdim=True))


def dist_info():
    """(rank, world_size, local_rank) from torchrun's environment variables."""
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("LOCAL_RANK", 0))


def print0(*args, **kw):
    if dist_info()[0] == 0:
        print(*args, **kw, flush=True)


# ----------------------------------------------------------------------------------------------------
# I.3 Data: pixel statistics, WeCLIP's training augmentation, the dataset item, the epoch sampler
# ----------------------------------------------------------------------------------------------------

IMAGENET_MEAN, IMAGENET_STD = (123.675, 116.28, 103.53), (58.395, 57.12, 57.375)  # on 0..255 RGB
CLIP_MEAN = tuple(255 * m for m in (0.48145466, 0.4578275, 0.40821073))
CLIP_STD = tuple(255 * s for s in (0.26862954, 0.26130258, 0.27577711))


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


def renormalize(x, src: str, dst: str):
    stats = {"imagenet": (IMAGENET_MEAN, IMAGENET_STD), "clip": (CLIP_MEAN, CLIP_STD)}
    (m0, s0), (m1, s1) = stats[src], stats[dst]
    t = lambda v: torch.tensor(v, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
    return (x * t(s0) + t(m0) - t(m1)) / t(s1)


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
    """The dataset item: an image, its mask (the ground truth: scored, never trained on), its image-level labels
    (the only supervision) and WeCLIP's augmentation for training. Part II reads the files: the split list and
    the images it names (read_split), the image-level labels (scan_labels: from the masks, cached) and each image
    (load_rgb, load_mask). In training, the index encodes (epoch, i) so that augmentation is a pure function of
    (seed, epoch, i): the same on any number of workers and after --resume."""

    def __init__(self, cfg: Config, split: str, train: bool):
        self.cfg, self.split, self.train = cfg, split, train
        self.num_classes = len(dataset_info(cfg)["classes"])
        self.items = read_split(cfg, split)  # [(name, image path, mask path or None)]
        self.labels = scan_labels(cfg, split, self.items)  # [sorted foreground class ids] per item
        if train:  # WeCLIP needs at least one foreground class per image (GradCAM target)
            keep = [i for i, lab in enumerate(self.labels) if lab]
            if len(keep) < len(self.items):
                print0(f"data: skipped {len(self.items) - len(keep)} {split} images with no foreground class "
                       f"(weak supervision learns only from the classes an image is tagged with)")
            self.items, self.labels = [self.items[i] for i in keep], [self.labels[i] for i in keep]
        if not self.items:
            raise WSSSError(f"split {split!r} in {cfg.data_root} has no usable images")
        self.epoch_len = len(self.items)
        self.masks = sum(m is not None for _, _, m in self.items)  # images with a mask (scored); 0: not scored

    def __len__(self):
        return len(self.items)

    def __getitem__(self, index: int) -> dict:
        epoch, i = divmod(int(index), self.epoch_len)
        name, image_path, mask_path = self.items[i]
        rgb = load_rgb(image_path)
        # no mask (your own data, or labels from a file): every pixel "ignore", so nothing is scored
        mask = load_mask(mask_path, self.num_classes) if mask_path is not None else \
            np.full(rgb.shape[:2], IGNORE, np.uint8)
        if rgb.shape[:2] != mask.shape:
            raise WSSSError(f"image {image_path} is {rgb.shape[1]}x{rgb.shape[0]} but its mask is "
                            f"{mask.shape[1]}x{mask.shape[0]}")
        if self.train:
            rgb, mask = augment(rgb, mask, self.cfg, np.random.default_rng([self.cfg.seed, epoch, i]))
        label = torch.zeros(self.num_classes - 1)  # multi-hot over the C foreground classes
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
# I.4 Frozen encoders: the text bank, the shared CLIP pass and its calibrated (dual) path, DiCLIP's SD attention
# ----------------------------------------------------------------------------------------------------

class Frozen:
    """Everything frozen for one run: CLIP, DINOv2 (CD-CLIP's SBE), Stable Diffusion and the TSA cache (DiCLIP), from
    Part II's load_assets (label_path=False: CLIP alone, for the decoder at test time; tsa_cache=False: the caller
    supplies `tsa`); the text bank, built here: texts (T, E) unit rows [C class prompts; Ns super-class
    prompts; Nb background prompts] (WeCLIP's template); super_of: class id (1..C) -> super-class id, 0 -> 0;
    cam_texts (patch-text CAMs): [C foreground texts, TSE-enriched for ExCEL; Nb background texts]."""

    def __init__(self, cfg: Config, device, need_dino: bool = None, label_path: bool = True, tsa_cache: bool = True):
        info = dataset_info(cfg)
        self.cfg, self.device, self.label_path = cfg, device, label_path
        assets = load_assets(cfg, device, need_dino, label_path, tsa_cache)  # Part II: hub, tiny/planted models, files
        self.clip, self.tokenizer = assets["clip"], assets["tokenizer"]
        self.dino, self.sd = assets["dino"], assets["sd"]
        self.patch = self.clip.visual.conv1.kernel_size[0]
        self.num_blocks = len(self.clip.visual.transformer.resblocks)
        supers = info["superclasses"][cfg.superclasses]
        self.num_fg, self.num_super = len(info["classes"]) - 1, len(supers)
        self.super_of = super_class_of(cfg).to(device)
        prompts = info["prompts"] + list(supers) + info["bg_prompts"]
        self.texts = assets["texts"] if assets["texts"] is not None else \
            encode_texts(self.clip, self.tokenizer, prompts, cfg.template, device)  # (T, E)
        if cfg.cam == "text":  # ExCEL / DiCLIP: [C foreground (TSE-enriched) texts; Nb background texts]
            fg = self.texts[: self.num_fg]
            if assets["attr_bank"] is not None:  # ExCEL TSE: t_c enriched by the attribute centroids A (E, B)
                self.attr_centroids, self.attr_flags = assets["attr_bank"]
                fg = tse_text_embeddings(fg, self.attr_centroids, cfg.tse_keep, cfg.tse_lambda, cfg.tse_drop)
            self.cam_texts = torch.cat([fg, self.texts[self.num_fg + self.num_super:]])
        # DiCLIP: {K, V} (Part II); not loaded for the decoder alone, and supplied by the caller without tsa_cache
        self.tsa = ensure_tsa_cache(self, cfg, device) if cfg.tsa != "off" and label_path and tsa_cache else None


# --- shared: the text bank (WeCLIP's zeroshot_classifier) and the CLIP image pass ---

def encode_texts(clip, tokenizer, names, template: str, device):
    """L2-normalised text embeddings (T, E) of `template.format(name)` (WeCLIP's zeroshot_classifier)."""
    with torch.no_grad():
        tokens = tokenizer([template.format(n) for n in names]).to(device)
        return F.normalize(clip.encode_text(tokens).float(), dim=-1)


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


def clip_image_forward(clip, images, n_attn: int = 0, full: bool = False, calib: dict = None) -> dict:
    """The one frozen CLIP pass every method shares, on any image size, without gradients.
    GradCAM methods (WeCLIP, CD-CLIP): blocks 1..L-1; the block-(L-1) output `x_last` is what GradCAM runs
    the last block on. Patch-text methods (ExCEL, DiCLIP; `full` or `calib`): all L blocks, and with `calib`
    the calibrated path of the last calib["n"] blocks beside the original one (see run_dual_block).
    Returns per-block patch tokens of the ORIGINAL path `feats` (the trained head's inputs), the head-averaged
    patch-to-patch attention of the last `n_attn` blocks run (B, n_attn, N, N) (the others run fused
    attention, which never materialises the map), and with `calib`: `x_new` (B, 1+N, D), the calibrated
    stream before ln_post with its CLS token copied from the original path, `u` (B, 1+N, D), the sum over the
    calibrated blocks of their values through out_proj (what an additive attention bias multiplies), and
    `bias_scale` (H for a head sum, 1 for a head mean)."""
    visual = clip.visual
    resblocks = visual.transformer.resblocks
    full = full or calib is not None
    blocks = resblocks if full else resblocks[:-1]
    n_calib = min(calib["n"], len(blocks) - 1) if calib else 0  # block 1 always runs plain (tiny models)
    with torch.no_grad():
        x = visual.conv1(images.to(visual.conv1.weight.dtype))  # (B, D, h, w)
        B, D, h, w = x.shape
        x = x.flatten(2).transpose(1, 2)  # (B, N, D), row-major token order
        x = torch.cat([visual.class_embedding.to(x.dtype).expand(B, 1, D), x], 1)  # (B, 1+N, D)
        x = visual.ln_pre(x + resized_pos_embed(visual, h, w).to(x.dtype))
        feats, attns, x_new, u = [], [], None, 0
        for i, blk in enumerate(blocks):
            if i >= len(blocks) - n_calib:  # ExCEL SVC / DiCLIP VCE: both paths read ln_1 of the ORIGINAL stream
                x_new = x if x_new is None else x_new  # the calibrated path starts from the first SVC block's input
                x, attn, y_new, u_b, mid = run_dual_block(blk, x, calib)
                x_new, u = x_new + y_new, u + u_b  # attention read-out only: no ln_2, no MLP on this path
                if calib.get("feats") == "upstream":  # ExCEL's in-place `x_ori += attn(...)` rewrote the entry
                    feats[-1] = mid[:, 1:]  # appended last: block b-1's output became x_ori^(b-1) + Y_ori^(b)
            else:
                x, attn = run_block(blk, x, need_attn=i >= len(blocks) - n_attn)
            # (B, N, D): the original path's tokens, clean [upstream bug fixed]; calib["feats"] "upstream"
            # reproduces ExCEL's code's aliasing (entry s-1 the calibrated stream, s..L-2 pre-MLP residuals)
            feats.append(x[:, 1:])
            if i >= len(blocks) - n_attn:
                attns.append(attn[:, 1:, 1:])  # (B, N, N): CLS row and column dropped
        out = dict(feats=feats, attn=torch.stack(attns, 1) if attns else None, x_last=x, grid=(h, w))
        if n_calib:
            x_new = torch.cat([x[:, :1], x_new[:, 1:]], 1)  # the CLS token comes from the original path
            if calib.get("feats") == "upstream":  # ... and `x_new += Y_new` rewrote the entry the new path began
                feats[len(blocks) - n_calib - 1] = x_new[:, 1:]  # from: it holds the final calibrated stream
            heads = resblocks[-1].attn.num_heads
            out.update(x_new=x_new, u=u, bias_scale=float(heads if calib.get("heads", "sum") == "sum" else 1),
                       n_calib=n_calib, heads=heads)
    return out


# --- CD-CLIP SBE: DINOv2 features ---

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


# --- ExCEL SVC (Eq. 6) and DiCLIP VCE (Eq. 7): the calibrated path beside CLIP's own ---

def attention_qkv(attn, a):
    """q, k, v of an nn.MultiheadAttention on batch-first a (B, L, D): each (B, H, L, d), and v before the
    head split (B, L, D)."""
    B, L, D = a.shape
    H = attn.num_heads
    qkv = F.linear(a, attn.in_proj_weight, attn.in_proj_bias)  # (B, L, 3D)
    q, k, v = qkv.view(B, L, 3, H, D // H).permute(2, 0, 3, 1, 4)  # each (B, H, L, d)
    return q, k, v, qkv[..., 2 * D:]


def svc_attention(q, k, v, scale):
    """ExCEL SVC intra-correlation, per head: A = 1/3 [softmax(q q^T s) + softmax(k k^T s) + softmax(v v^T s)],
    each softmax row-wise with CLIP's scale s = d^-1/2. (..., H, L, d) -> (..., H, L, L), rows sum to 1."""
    return sum(((x @ x.transpose(-1, -2)) * scale).softmax(-1) for x in (q, k, v)) / 3


def vce_fusion(attn, a_acr, w: float = 1.0, mode: str = "add"):
    """How SD attention enters CLIP's attention (DiCLIP Eq. 7 and Table XII; definitions from §V-A.3 [T], details
    [I]). attn: CLIP's patch-patch softmax probabilities (..., N, N) (e.g. (B, heads, N, N)); a_acr (B, N, N),
    broadcast over heads by the caller's shape (pass a_acr[:, None] for heads).
      add   attn + w A_acr, no re-normalisation (the paper's choice; rows then sum to 1 + w)
      norm  softmax(attn + w A_acr) over the keys ("an additional softmax after adding")
      scale attn * (w A_acr) ("multiplies CLIP's attention by the SD map")
      gate  w A_acr where A_acr > its row mean, attn elsewhere ("replacing only the most confident SD activations")"""
    if mode == "add":
        return attn + w * a_acr
    if mode == "norm":
        return (attn + w * a_acr).softmax(-1)
    if mode == "scale":
        return attn * (w * a_acr)
    if mode == "gate":
        return torch.where(a_acr > a_acr.mean(-1, keepdim=True), w * a_acr, attn)
    raise WSSSError(f"VCE fusion {mode!r} is not one of {', '.join(VCE_FUSIONS)}")


def run_dual_block(blk, x, calib: dict):
    """One calibrated block (ExCEL §SVC; DiCLIP's VCE uses the same block with calib["attn"] = "qk").
    X = ln_1(x_ori); q, k, v = heads(X W_in + b_in); the ORIGINAL path is the frozen block:
    x_ori + out_proj(concat_h softmax(q_h k_h^T s) v_h), then + MLP(ln_2(.)). The CALIBRATED read-out uses
    the chosen per-head map A_h (ExCEL: svc_attention; "qk": the standard map), reduced over heads to one map
    Abar (ExCEL sums the heads [code≠paper]: rows sum to H; or the mean), which every head reads its values
    with: Y_new = out_proj(concat_h(Abar v_h)) = (Abar v) W_o^T + b_o.
    An additive patch-patch bias w*Bias on each head's map (ExCEL's LVC term, DiCLIP's ACR attention) adds
    c w Bias (v W_o^T) to the patch rows of Y_new (c = H for a sum, 1 for a mean): it is linear, so the block
    returns u = v W_o^T and the bias is applied once after the pass (calibrated_tokens), for any bias, with
    no second CLIP forward. Returns (x_ori next (B, 1+N, D), head-averaged original attention (B, 1+N, 1+N),
    Y_new (B, 1+N, D), u (B, 1+N, D), the block's post-attention pre-MLP residual x_ori + Y_ori (B, 1+N, D))."""
    attn = blk.attn
    a = blk.ln_1(x)
    q, k, v, v_all = attention_qkv(attn, a)
    B, L, D = a.shape
    scale = q.shape[-1] ** -0.5
    a0 = ((q @ k.transpose(-1, -2)) * scale).softmax(-1)  # (B, H, L, L): CLIP's own map
    y_ori = F.linear((a0 @ v).transpose(1, 2).reshape(B, L, D), attn.out_proj.weight, attn.out_proj.bias)
    amap = svc_attention(q, k, v, scale) if calib.get("attn", "intra") == "intra" else a0
    if calib.get("bias") is not None:  # DiCLIP Eq. 7: the SD map joins each head's patch-patch block (vce_fusion)
        amap = amap.clone()
        amap[..., 1:, 1:] = vce_fusion(amap[..., 1:, 1:], calib["bias"][:, None].to(amap.dtype),
                                       calib.get("weight", 1.0), calib.get("fusion", "add"))
    abar = amap.sum(1) if calib.get("heads", "sum") == "sum" else amap.mean(1)  # (B, L, L)
    y_new = blk.ls_1(F.linear(abar @ v_all, attn.out_proj.weight, attn.out_proj.bias))  # (B, L, D)
    u = blk.ls_1(F.linear(v_all, attn.out_proj.weight))  # (B, L, D): LayerScale is linear too
    mid = x + blk.ls_1(y_ori)
    return mid + blk.ls_2(blk.mlp(blk.ln_2(mid))), a0.mean(1), y_new, u, mid


def calibrated_tokens(visual, out: dict, bias=None, weight: float = 1.0, norm: str = "tokens"):
    """The calibrated path's final tokens P = ln_post(x_new + c w Bias u) W_proj, L2-normalised along the
    TOKEN axis as ExCEL's code (per channel, across the 1+N tokens [code≠paper]) or per token ("channels").
    bias (B, N, N) acts on the patch rows/columns only (CLS untouched). -> (B, 1+N, E) with CLS first."""
    x = out["x_new"]
    if bias is not None and weight != 0:
        x = torch.cat([x[:, :1], x[:, 1:] + (out["bias_scale"] * weight) * (bias @ out["u"][:, 1:])], 1)
    p = visual.ln_post(x) @ visual.proj  # (B, 1+N, E)
    return F.normalize(p.float(), dim=1 if norm == "tokens" else -1)


def attn_blocks_needed(cfg: Config, num_blocks: int) -> int:
    """How many blocks must return attention maps for --refine. GradCAM methods: of blocks 1..L-1 (the last
    block's comes from GradCAM): the static mean uses the last attn_layers blocks, dynamic RFM the last
    rfm_dynamic_layers. Patch-text methods run all L blocks in the frozen pass."""
    if cfg.refine == "none":
        return 0
    n = max(cfg.attn_layers, cfg.rfm_dynamic_layers if "rfm" in cfg.refine else 0)
    return min(n, num_blocks) - (0 if cfg.cam == "text" else 1)


def calib_spec(cfg: Config, bias=None):
    """The calibrated path a method asks of clip_image_forward (None: GradCAM methods, no calibrated path):
    ExCEL's SVC in the last svc_layers blocks; DiCLIP's VCE in the last vce_layers blocks with `bias` (its
    ACR attention) fused into each head's map inside the blocks. DiCLIP's path (the standard q-k map, svc_attn
    "qk") keeps its vce_layers blocks without VCE too, so --no-vce removes the SD map and nothing else (the
    "w/o VCE" rows of Tables IV/VI) [I]."""
    if cfg.cam != "text":
        return None
    n = cfg.vce_layers if cfg.vce or cfg.svc_attn == "qk" else cfg.svc_layers
    return dict(n=n, attn=cfg.svc_attn, heads=cfg.svc_heads, bias=bias, weight=cfg.vce_weight, fusion=cfg.vce_fusion,
                feats=cfg.adapter_feats)


# --- DiCLIP: Stable Diffusion's self-attention A_sd (§III-C.2, §IV-B) ---

class SDParts:
    """The frozen Stable Diffusion parts DiCLIP uses, plus the null-prompt text embedding (computed once)."""

    def __init__(self, vae, unet, scheduler, tokenizer, text_encoder, device, sampler=None):
        self.vae, self.unet, self.scheduler = vae, unet, scheduler  # scheduler: the one noising step (DDIM's betas)
        self.sampler = sampler or scheduler  # the generation sampler of the TSA cache images
        self.tokenizer, self.text_encoder, self.device = tokenizer, text_encoder, device
        # the UNet halves the latent (len(down_blocks) - 1) times, the VAE 2^(len(blocks) - 1) times
        self.vae_factor = 2 ** (len(vae.config.block_out_channels) - 1)
        self.factor = self.vae_factor * 2 ** (len(unet.config.block_out_channels) - 1)
        self.null_emb = self.encode_prompt([""])  # (1, 77, Dt): SD's unconditional embedding, "null prompt" [T]

    def encode_prompt(self, prompts):
        ids = self.tokenizer(prompts, padding="max_length", max_length=self.tokenizer.model_max_length,
                             truncation=True, return_tensors="pt").input_ids.to(self.device)
        with torch.no_grad():
            return self.text_encoder(ids)[0].float()  # (P, 77, Dt) last hidden state, as SD conditions on


def sd_attention_layers(unet, spec: str) -> list:
    """Names of the UNet attention processors whose self-attention DiCLIP reads: "up" = every attn1 of the decoder
    (up_blocks; SD 2.1: up_blocks.{1,2,3}.attentions.{0,1,2}, 9 layers at 16^2, 32^2, 64^2 latent tokens for a
    512 input [I]); or a comma list of name prefixes (e.g. "up_blocks.3" = the 64^2 layers only)."""
    names = [n for n in unet.attn_processors if ".attn1." in n]
    if spec.strip() == "up":
        chosen = [n for n in names if n.startswith("up_blocks.")]
    else:
        prefixes = [p.strip() for p in spec.split(",") if p.strip()]
        chosen = [n for n in names if any(n.startswith(p) for p in prefixes)]
    if not chosen:
        raise WSSSError(f"--sd-layers {spec!r} selects no self-attention (attn1) layer of the UNet; use up, or "
                        f"prefixes of e.g. {names[-1].rsplit('.attn1', 1)[0]}")
    return chosen


class SDAttentionCapture:
    """A diffusers attention processor for one self-attention (attn1) layer. It computes the layer's normal output
    (scaled_dot_product_attention, which never materialises the map) and, on the side, DiCLIP's attention on the
    CLIP grid [T §IV-B]: q and k (after their projections) are resized bilinearly from the layer's latent grid to
    the CLIP grid (h, w), then per head softmax(q k^T * scale) on the small grid is averaged over heads and added
    to `store["sum"]` (B, N, N). So a 4096-token layer costs an N x N map, never 4096 x 4096."""

    def __init__(self, store: dict):
        self.store = store

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, *args, **kw):
        assert encoder_hidden_states is None and attention_mask is None, "self-attention layers only"
        assert attn.spatial_norm is None and attn.group_norm is None and hidden_states.ndim == 3, \
            "SDAttentionCapture supports SD's transformer self-attention (B, L, C) layers"
        B, L, _ = hidden_states.shape
        q, k, v = attn.to_q(hidden_states), attn.to_k(hidden_states), attn.to_v(hidden_states)  # (B, L, H*d)
        H = attn.heads
        d = q.shape[-1] // H
        q, k, v = (t.view(B, L, H, d).transpose(1, 2) for t in (q, k, v))  # (B, H, L, d)
        if attn.norm_q is not None:
            q, k = attn.norm_q(q), attn.norm_k(k)
        out = F.scaled_dot_product_attention(q, k, v, scale=attn.scale)  # the layer's real output (B, H, L, d)
        # --- the side computation: resize q and k (not the map) to the CLIP grid ---
        lh, lw = self.store["latent"]
        f = int(round(math.sqrt(lh * lw / L)))  # this layer's downsampling of the latent grid
        gh, gw = self.store["grid"]

        def to_grid(t):  # (B, H, L, d) -> (B, H, N, d)
            t = t.transpose(2, 3).reshape(B, H * d, lh // f, lw // f)
            t = F.interpolate(t.float(), size=(gh, gw), mode="bilinear", align_corners=False)
            return t.reshape(B, H, d, gh * gw).transpose(2, 3)

        probs = (to_grid(q) @ to_grid(k).transpose(-1, -2) * attn.scale).softmax(-1)  # (B, H, N, N)
        self.store["sum"] = self.store.get("sum", 0) + probs.mean(1)  # head mean [T]
        self.store["count"] = self.store.get("count", 0) + 1
        out = out.transpose(1, 2).reshape(B, L, H * d).to(q.dtype)
        out = attn.to_out[1](attn.to_out[0](out))
        if attn.residual_connection:
            out = out + hidden_states
        return out / attn.rescale_output_factor


def sd_self_attention(sd: SDParts, images, cfg: Config, grid):
    """DiCLIP's SD attention A_sd (§III-C.2, §IV-B): the CLIP-normalised crops (B, 3, H, W) -> RGB in [0, 1] -> resized
    to sd_size^2 -> 2x - 1 -> VAE latent mean x scaling factor -> one noising step to t = sd_timestep with noise from a
    fixed seed (one draw shared by every image, so an image's map does not depend on its batch) -> one UNet pass with
    the null-prompt embedding. The selected decoder attn1 layers give A_sd (B, N, N) on the CLIP grid (h, w): head mean,
    then layer mean [I]; rows sum to 1. fp32, no grad; the UNet's processors are restored after."""
    S, unet = cfg.sd_size, sd.unet
    if S % sd.factor:
        raise WSSSError(f"--sd-size {S} is not a multiple of {sd.factor} (the VAE's factor {sd.vae_factor} times "
                        f"the UNet's {sd.factor // sd.vae_factor}); try {max(1, round(S / sd.factor)) * sd.factor}")
    gh, gw = grid
    layers = sd_attention_layers(unet, cfg.sd_layers)
    stats = {"imagenet": (IMAGENET_MEAN, IMAGENET_STD), "clip": (CLIP_MEAN, CLIP_STD)}[cfg.norm]
    mean, std = (torch.tensor(v, device=images.device).view(1, 3, 1, 1) for v in stats)
    with torch.no_grad(), fp32(images.device):
        rgb = ((images.float() * std + mean) / 255).clamp(0, 1)  # (B, 3, H, W) in [0, 1]
        x = F.interpolate(rgb, size=(S, S), mode="bilinear", align_corners=False, antialias=True) * 2 - 1
        z0 = sd.vae.encode(x.to(sd.device)).latent_dist.mean * sd.vae.config.scaling_factor  # (B, 4, S/8, S/8)
        g = torch.Generator().manual_seed(cfg.seed)  # fixed-seed noise [DS]; the global RNG is not touched
        noise = torch.randn((1, *z0.shape[1:]), generator=g).to(z0.device).expand_as(z0)
        t = torch.tensor([cfg.sd_timestep], device=z0.device)
        zt = sd.scheduler.add_noise(z0, noise, t)  # sqrt(abar_t) z0 + sqrt(1 - abar_t) eps
        store = dict(latent=tuple(z0.shape[-2:]), grid=(gh, gw))
        original = dict(unet.attn_processors)
        capture = SDAttentionCapture(store)
        unet.set_attn_processor({n: (capture if n in layers else p) for n, p in original.items()})
        try:
            unet(zt, t.expand(len(zt)), encoder_hidden_states=sd.null_emb.expand(len(zt), -1, -1))
        finally:
            unet.set_attn_processor(dict(original))  # set_attn_processor consumes the dict it is given
    assert store["count"] == len(layers), "each selected layer runs once"
    return store["sum"] / store["count"]  # (B, N, N): layer mean, row-stochastic


# ----------------------------------------------------------------------------------------------------
# I.5 CAMs: WeCLIP GradCAM (every image-class pair in one pass); ExCEL TSE texts; patch-text CAMs
# ----------------------------------------------------------------------------------------------------

# --- WeCLIP (and CD-CLIP): GradCAM on image-text probabilities ---

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
    """WeCLIP GradCAM (official code clip_tool.py, pytorch_grad_cam) for all rows at once. Each row replicates its
    image's block-(L-1) output and runs the last block on it; the hooked activation A is the last block's ln_1 output,
    whose gradient reaches it only through attention. Target y_r = softmax(s * <e, t_k>)[target_r], e = proj(mean of
    ln_post patch tokens) normalised, over the row's allowed texts. Rows are independent, so one backward of sum_r y_r
    yields every row's own gradient: the same CAMs as one backward per class, in one pass. GradCAM: alpha = spatial mean
    of dy/dA; cam = ReLU(sum_ch alpha_ch A_ch), min-max twice (as upstream). Returns cams (R, h, w), the last block's
    attention per image (B, N, N) and its final patch embeddings (B, N, E), L2-normalised (CD-CLIP's F)."""
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


def super_class_of(cfg: Config):
    """CD-CLIP's super-class map of the chosen table: class id (1..C) -> super-class id (1..Ns), 0 -> 0. (C+1,)
    Without a table (your own data without superclasses.txt: SBE off) every class maps to 0."""
    info = dataset_info(cfg)
    supers = info["superclasses"][cfg.superclasses]
    index = {name: i + 1 for i, name in enumerate(supers)}
    owner = {c: index[s] for s, members in supers.items() for c in members}
    return torch.tensor([0] + [owner.get(c, 0) for c in info["classes"][1:]])


# --- ExCEL TSE: class texts enriched by clustered attribute sentences ---

def tse_num_clusters(cfg: Config, n_sentences: int) -> int:
    """B: --tse-clusters, or ExCEL's ratio of sentences to clusters (VOC 400/112, COCO 1600/224) [I]."""
    if cfg.tse_clusters:
        return cfg.tse_clusters
    return max(1, round(n_sentences * dataset_info(cfg).get("attr_ratio", 112 / 400)))

def cluster_attributes(clip, tokenizer, flat: list, classes: list, B: int, device):
    """ExCEL's attribute bank (TSE knowledge base, Supp. §1): the description sentences (class, lower-cased
    sentence) in `flat` -> CLIP text encoder -> per-sentence L2 norm -> sklearn KMeans(B, random_state=0,
    n_init=10). -> centroids A (E, B), NOT re-normalised (as upstream), and per-class flags (C, B): which clusters
    hold a sentence of the class (ExCEL never uses them)."""
    from sklearn.cluster import KMeans
    emb = []
    with torch.no_grad():
        for i in range(0, len(flat), 256):
            tokens = tokenizer([s for _, s in flat[i:i + 256]]).to(device)
            emb.append(F.normalize(clip.encode_text(tokens).float(), dim=-1).cpu())
    emb = torch.cat(emb).double().numpy()  # (n, E), unit rows
    km = KMeans(n_clusters=B, random_state=0, n_init=10).fit(emb)
    A = torch.from_numpy(km.cluster_centers_.T.copy()).float()  # (E, B): centroids a_b
    flags = torch.zeros(len(classes), B)
    for (c, _), b in zip(flat, km.labels_):
        flags[classes.index(c), int(b)] = 1.0
    return A, flags


def tse_text_embeddings(class_emb, centroids, keep_ratio: float = 0.9, lam: float = 1.0, drop: str = "exact"):
    """ExCEL TSE retrieval (TOP-K attribute hunting; K_r and lambda: Supp. §1, §2.1). class_emb (C, E) unit template
    embeddings t_c, centroids A (E, B). s_cb = t_c . a_b (raw dot products: no temperature, centroids not normalised);
    drop the lowest k = floor((1 - K_r) B) scores (K_r = 0.9 keeps the top 90 %: B = 112 keeps 101); w = softmax of the
    kept; T_c = normalise(t_c + lam sum_b w_cb a_b). Upstream computes k by float truncation (B = 10 drops 0, and k = 0
    masked every score: NaN); here k is exact and k = 0 keeps all [upstream bug fixed]. The two counts differ for
    every B that is a multiple of 10 (B = 20: exact 2, truncated 1) and agree for ExCEL's B = 112 and 224 (11, 22);
    drop "upstream" truncates as upstream (k = 0 still keeps all). -> (C, E) unit rows."""
    s = class_emb @ centroids  # (C, B)
    B = s.shape[1]
    k_drop = int(math.floor((1 - keep_ratio) * B + 1e-9)) if drop == "exact" else int((1 - keep_ratio) * B)
    if k_drop >= B:  # the softmax over no attribute would be NaN
        raise WSSSError(f"--tse-keep {keep_ratio} keeps none of the B = {B} attributes: raise it to >= {1 / B:.3g}")
    if k_drop:
        low = s.topk(k_drop, dim=1, largest=False).indices  # the k lowest scores of each class
        s = s.scatter(1, low, float("-inf"))
    w = s.softmax(1)  # (C, B): weights of the kept attributes
    # T_c = t_c + lambda sum_b w_cb a_b, then L2-normalised
    return F.normalize(class_emb + lam * w @ centroids.T, dim=-1)


# --- ExCEL (and DiCLIP Eq. 1): patch-text CAMs of the calibrated tokens ---

def feature_surgery(tokens, texts):
    """ExCEL's patch-text CAM (CLIP-Surgery feature surgery: ExCEL code clip_feature_surgery; DiCLIP Eq. 1). tokens (B,
    1+N, E) with CLS first, texts (T, E) unit rows (C foreground then the background words) -> (B, 1+N, T) in [0, 1]. p
    = softmax_t(2 <P_cls, T_t>) (temperature 0.5), w_t = p_t / mean(p); sim_it = w_t <P_i, T_t> minus its mean over ALL
    texts (the redundant feature); then min-max per text over ALL 1+N tokens, CLS included, no ReLU [code≠paper: the
    paper writes Norm(cos(P, T))]. A flat map (zero range) gives 0, not NaN."""
    sim = tokens.float() @ texts.float().T  # (B, 1+N, T)
    p = (2 * sim[:, :1]).softmax(-1)  # (B, 1, T): the class prior from the CLS token
    s = (p / p.mean(-1, keepdim=True)) * sim  # w_t <P_i, T_t>
    s = s - s.mean(-1, keepdim=True)  # minus (1/T) sum_t' w_t' <P_i, T_t'>
    lo = s.amin(1, keepdim=True)
    return (s - lo) / (s.amax(1, keepdim=True) - lo).clamp_min(1e-12)  # per text over the tokens


def patch_text_cam(tokens, texts, num_fg: int, sim: str = "surgery"):
    """The static (or, with a bias in `tokens`, dynamic) CAM of every foreground class: (B, N, C) in [0, 1].
    surgery: feature_surgery, CLS dropped, foreground columns kept (ExCEL code). cosine: the paper-literal
    Norm(cos(P_i, T_c)), per-token cosine then min-max over the patches."""
    if sim == "surgery":
        return feature_surgery(tokens, texts)[:, 1:, :num_fg]
    cos = F.normalize(tokens[:, 1:].float(), dim=-1) @ texts[:num_fg].float().T  # (B, N, C)
    lo = cos.amin(1, keepdim=True)
    return (cos - lo) / (cos.amax(1, keepdim=True) - lo).clamp_min(1e-12)


# ----------------------------------------------------------------------------------------------------
# I.6 Refinements: transition matrix, boxes, RFM (WeCLIP), CDA (CD-CLIP), CAA (ExCEL), PAR, label assembly
# ----------------------------------------------------------------------------------------------------

# --- WeCLIP: transition matrix, box masks, RFM ---

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
    cam = cam.reshape(-1, h, w)
    # DiCLIP's M_st = M_p + alpha N(M_s) reaches 1 + alpha: such a map is scaled to max 1 first, or uint8 would
    # wrap around (the threshold is relative to the max, so [0, 1] maps are unchanged) [I]
    cam = cam / cam.amax((1, 2), keepdim=True).clamp_min(1.0)
    s = (cam * 255).to(torch.uint8).long()  # (M, h, w), truncation as numpy's astype
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


# --- CD-CLIP: CDA (class-distribution affinity) and SBE's CAP prototypes ---

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


# --- ExCEL: CAA's attention maps ---

def caa_maps(out: dict, cfg: Config):
    """The attention maps CAA averages (ExCEL code refine_cams_with_aff; not in the paper text): the original path's
    patch-patch attention of the last blocks. Upstream's maps of the SVC blocks are head SUMS (rows sum to H) beside a
    head-averaged one, so the average weights the plain block 1/H as much; `caa_attn_mix upstream` reproduces it, `mean`
    averages head-averaged maps. These are the ORIGINAL path's maps: --svc-heads (the calibrated read-out) does
    not change them. DiCLIP: the same mix on its 3 VCE blocks (x H) beside 3 plain ones [I]. -> (B, n, N, N)."""
    attn = out["attn"].float()
    n_sum = min(out.get("n_calib", 0), attn.shape[1])
    if cfg.caa_attn_mix != "upstream" or not n_sum:
        return attn
    w = torch.ones(attn.shape[1], device=attn.device)
    w[attn.shape[1] - n_sum:] = out["heads"]
    return attn * w[None, :, None, None]


# --- DiCLIP ACR (§III-C.2, Eqs. 4-6): cluster the SD attention rows, keep reliable relations ---

def _kl_to_centroids(rows, neg_ent, cent):
    """KL(a_i || c_k) = sum_j a log a - sum_j a log c for rows (M, N, D), their sum_j a log a (M, N, 1) and
    centroids (M, K, D) -> (M, N, K); 0 log 0 = 0, logs of values clamped at 1e-8."""
    return neg_ent - rows @ cent.clamp_min(1e-8).log().transpose(-1, -2)


def kl_kmeans(rows, k: int, iters: int = 10, seed: int = 0, return_all: bool = False):
    """K-means of probability rows under the KL divergence (DiCLIP Eq. 4 [T], cites [52]; details [I]).
    rows (..., N, D), each row a distribution (A_sd: D = N) -> assignments (..., N) int64 in [0, k).
    Assignment m_i = argmin_k KL(a_i || c_k); update c_k = mean of its members (the exact minimiser for this
    Bregman divergence, so the objective sum_i KL(a_i || c_{m_i}) never rises); probabilities clamped at 1e-8
    before logs. Init: k-means++ under KL: the first centre is a row, each next centre a row drawn with probability
    proportional to its KL to the nearest centre chosen so far. The draws are inverse-CDF lookups of k uniforms from
    `seed`, shared by every map, so a map's clustering does not depend on its batch. An empty cluster is re-seeded
    with the row farthest (KL) from its centroid. Vectorised over the leading dims; loops only over iterations.
    return_all: also the centroids (..., k, D) and the objective after each assignment (iters + 1, ...)."""
    lead, (N, D) = rows.shape[:-2], rows.shape[-2:]
    a = rows.reshape(-1, N, D).float()
    M, k = a.shape[0], min(k, N)
    ar = torch.arange(M, device=a.device)
    neg_ent = (a * a.clamp_min(1e-8).log()).sum(-1, keepdim=True)  # (M, N, 1), once
    u = torch.rand(k, generator=torch.Generator().manual_seed(seed)).to(a.device)
    # k-means++ under KL
    first = (u[0] * N).long().clamp_max(N - 1).expand(M)
    cent = a[ar, first][:, None]  # (M, 1, D)
    for j in range(1, k):
        d = _kl_to_centroids(a, neg_ent, cent).amin(-1).clamp_min(0) + 1e-12  # (M, N)
        cdf = d.cumsum(-1)
        pick = torch.searchsorted(cdf, (u[j] * cdf[:, -1:]).contiguous()).clamp_max(N - 1)[:, 0]  # (M,)
        cent = torch.cat([cent, a[ar, pick][:, None]], 1)  # (M, j + 1, D)
    history = []
    for it in range(iters + 1):
        kl = _kl_to_centroids(a, neg_ent, cent)  # (M, N, k)
        m = kl.argmin(-1)  # (M, N)
        dist = kl.gather(-1, m[..., None])[..., 0]  # (M, N): each row's KL to its centroid
        history.append(dist.sum(-1))
        if it == iters:
            break
        onehot = F.one_hot(m, k).float()  # (M, N, k)
        count = onehot.sum(1)  # (M, k)
        cent = (onehot.transpose(1, 2) @ a) / count.clamp_min(1)[..., None]  # (M, k, D): member means
        empty = count == 0
        if empty.any():  # the e-th empty cluster of a map takes that map's e-th farthest row
            far = dist.argsort(-1, descending=True)  # (M, N)
            rank = (empty.cumsum(-1) - 1).clamp(0, N - 1)  # (M, k)
            cent = torch.where(empty[..., None], a[ar[:, None], far.gather(-1, rank)], cent)
    m = m.reshape(*lead, N)
    if return_all:
        return m, cent.reshape(*lead, k, D), torch.stack(history).reshape(iters + 1, *lead)
    return m


def acr_reliable(attn, assign, delta: float):
    """DiCLIP Eqs. 5-6's reliable affinity: R = onehot(m) onehot(m)^T (R_ij = 1 iff tokens i, j share a cluster,
    Eq. 5), A_hat = RowNorm(R * A * 1[A > delta]) with the diagonal always kept (a row left empty becomes e_i).
    attn (B, N, N), assign (B, N) -> (B, N, N) row-stochastic."""
    R = assign[..., :, None] == assign[..., None, :]  # (B, N, N) bool: Eq. 5
    keep = R & (attn > delta)
    eye = torch.eye(attn.shape[-1], dtype=torch.bool, device=attn.device)
    a_hat = torch.where(keep | eye, attn, torch.zeros_like(attn))
    s = a_hat.sum(-1, keepdim=True)
    a_hat = torch.where(s > 0, a_hat / s.clamp_min(1e-30), eye.to(attn.dtype).expand_as(attn))  # all-zero row guard
    return a_hat


def acr_refine(a_sd, k: int = 9, delta: float = 5e-4, rounds: int = 3, variant: str = "left", iters: int = 10,
               seed: int = 0):
    """DiCLIP ACR (§III-C.2, Eqs. 4-6; the paper text lost the formulas: Eqs. 4-5 read from its prose, 6 [I]):
      m = KL-k-means(rows of A_sd)                                  (Eq. 4)
      R = onehot(m) onehot(m)^T                                     (Eq. 5)
      A_hat = RowNorm(R * A_sd * 1[A_sd > delta])                   (Eq. 6, reliable same-cluster relations)
      A^(0) = A_sd,  A^(t) = A_hat A^(t-1),  t = 1..T               (Eq. 6, recursive propagation; "left")
    Variants (switch `variant`, [I]): "recluster" re-clusters A^(t-1) each round (new R, A_hat still from A_sd);
    "right" A^(t) = A^(t-1) A_hat; "sharpen" A^(t) = RowNorm(A^(t-1) * A_hat).
    a_sd (B, N, N) row-stochastic -> (B, N, N) row-stochastic. rounds = 0 returns a_sd (ACR off)."""
    if variant not in ACR_VARIANTS:
        raise WSSSError(f"ACR variant {variant!r} is not one of {', '.join(ACR_VARIANTS)}")
    a = a_sd.float()
    if rounds == 0:
        return a
    a_hat = acr_reliable(a, kl_kmeans(a, k, iters, seed), delta)
    for t in range(rounds):
        if variant == "recluster" and t > 0:  # [I]: R from clustering the current map; A_hat still masks A_sd
            a_hat = acr_reliable(a_sd.float(), kl_kmeans(a, k, iters, seed), delta)
        if variant in ("left", "recluster"):
            a = a_hat @ a
        elif variant == "right":
            a = a @ a_hat
        else:  # sharpen
            a = a * a_hat
            a = a / a.sum(-1, keepdim=True).clamp_min(1e-30)  # the diagonal of A_hat keeps every row non-zero
    return a


# --- shared: the propagation matrix per --refine, PAR, label assembly ---

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


def contrast_minmax(cams, floor: float = 0.0, eps: float = 1e-7):
    """minmax with a contrast floor [I] (a guard; upstream has floor 0): (x - min) / max(max - min, floor max).
    A map whose range is below `floor` of its peak (an almost flat refined CAM: the propagation averaged its
    evidence away) is no longer stretched to [0, 1], so the residue of noise in it cannot outscore the
    background; maps with more contrast are min-maxed exactly as upstream. cams (R, h, w) >= 0."""
    lo, hi = cams.amin((-2, -1), keepdim=True), cams.amax((-2, -1), keepdim=True)
    return (cams - lo) / torch.maximum(eps + (hi - lo), floor * hi)  # upstream's order: 1e-7 + (x - min).max()


def label_scores(cams, img, cls, B: int, size, bg_pow: float, floor: float = 0.0):
    """WeCLIP generate_cam_label up to PAR: min-max each refined CAM, upsample (bilinear) to `size`, and pack
    the rows of each image into channels after a background channel (1 - max_c CAM)^bg_pow. Unused channels
    are -1 and never win. cams (R, h, w), img (R,), cls (R,) ids -> scores (B, 1+K, H, W) and the channel ->
    id table (B, 1+K)."""
    up = F.interpolate(contrast_minmax(cams, floor)[:, None], size=size, mode="bilinear",
                       align_corners=False)[:, 0]  # (R, H, W)
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
    scored = [label_scores(cams, img, cls, B, size, cfg.bg_pow, cfg.cam_contrast_floor) for cams, img, cls in groups]
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


# --- the frozen pass of a batch, then the whole label path of a batch ---

def vce_attention(frozen, images, cfg: Config, grid):
    """DiCLIP §4.1-4.2: A_sd of the crops (sd_self_attention), refined by ACR (acr_rounds = 0: A_sd itself)."""
    a_sd = sd_self_attention(frozen.sd, images, cfg, grid)
    if not cfg.acr_rounds:
        return a_sd
    return acr_refine(a_sd, cfg.acr_k, cfg.acr_delta, cfg.acr_rounds, cfg.acr_variant, cfg.acr_iters, seed=0)


def frozen_pass(frozen, images, cfg: Config, n_attn: int = None) -> dict:
    """The frozen pass of one batch for any method: [DiCLIP: SD self-attention -> ACR ->] CLIP with the method's
    calibrated path. fp32 and no gradient whatever the training autocast."""
    n_attn = attn_blocks_needed(cfg, frozen.num_blocks) if n_attn is None else n_attn
    with torch.no_grad(), fp32(images.device):
        bias = None
        if cfg.vce:  # DiCLIP VCE: A_acr from the SD UNet's decoder self-attention, on the CLIP grid
            grid = (images.shape[-2] // frozen.patch, images.shape[-1] // frozen.patch)
            bias = vce_attention(frozen, images, cfg, grid)
        out = clip_image_forward(frozen.clip, images, n_attn, calib=calib_spec(cfg, bias))
        out["a_acr"] = bias
    return out


def make_pseudo_labels(frozen: Frozen, out: dict, images, labels, cfg: Config, S=None, dynamic=False,
                       with_super=None, use_par=True, size=None, keep_cams=False, bias=None,
                       bias_weight: float = 1.0, Z=None) -> dict:
    """The whole label path of one batch: the initial CAMs of every (image, class) [and super-class] row
    (GradCAM in one pass, or the patch-text CAM of the calibrated tokens, with `bias` added to their
    patch-patch attention: ExCEL's dynamic CAM), the method's propagation matrix, box masks where the mode
    uses them, pseudo-labels Y (B, H, W) and, for CD-CLIP's SBE, super-class pseudo-labels Y_s (B, H, W) from
    DINO prototype CAMs. DiCLIP (tsa): Y from M_st = M_p + alpha N(static retrieval) (tsa static), or Y from
    M_dt = M_p + alpha N(softmax(Z) fg) and Y_st from M_st (tsa dynamic; Z: the adapter's logits (B, N, C+1))."""
    with fp32(images.device):  # the label path is fp32 whatever the training autocast (see compute_losses)
        return _make_pseudo_labels(frozen, out, images.float(), labels, cfg, S, dynamic, with_super, use_par,
                                   size, keep_cams, bias, bias_weight, Z)


def _make_pseudo_labels(frozen, out, images, labels, cfg, S, dynamic, with_super, use_par, size, keep_cams, bias,
                        bias_weight, Z=None):
    with_super = cfg.lambda_b > 0 if with_super is None else with_super
    # 1. initial CAMs M_init, one row per (image, present class) [and (image, present super-class)]
    rows = cam_rows(labels, frozen, with_super=with_super)
    if cfg.cam == "gradcam":  # WeCLIP / CD-CLIP: one GradCAM backward for all rows
        cams, attn_last, patch_emb = gradcam(frozen, out, rows)
        attn_all = attn_last[:, None] if out["attn"] is None else \
            torch.cat([out["attn"].float(), attn_last[:, None]], 1)  # (B, n_attn + 1, N, N): the last blocks
    else:  # ExCEL / DiCLIP: the patch-text CAM of the calibrated tokens; no gradient at all
        tokens = calibrated_tokens(frozen.clip.visual, out, bias, bias_weight, cfg.svc_norm)  # (B, 1+N, E)
        cam_all = patch_text_cam(tokens, frozen.cam_texts, frozen.num_fg, cfg.cam_sim)  # (B, N, C): M_p
        h, w = out["grid"]
        if cfg.tsa != "off":  # DiCLIP TSA: the cache refines M_p (Eq. 11), the adapter too (Eq. 13)
            feats = cache_features(tokens)
            m_st = static_cache_fusion(cam_all, static_cache_cam(feats, frozen.tsa["keys"], frozen.tsa["values"],
                                                                 cfg.cache_beta), cfg.cache_alpha, cfg.cache_negative)
            if cfg.tsa == "dynamic" and Z is not None:
                cam_st = m_st[rows["img"], :, rows["cls"] - 1].view(-1, h, w)
                cam_all = dynamic_cam(cam_all, Z, cfg.cache_alpha, cfg.cache_dyn_softmax)  # M_dt
            else:
                cam_all = m_st
        cams = cam_all[rows["img"], :, rows["cls"] - 1].view(-1, h, w)  # (R, h, w)
        attn_all = caa_maps(out, cfg) if out["attn"] is not None else None  # (B, n_attn, N, N)
        patch_emb = F.normalize(tokens[:, 1:], dim=-1)
    # 2. the affinity: attention of the last blocks (+ the decoder's S, + class distributions) -> A^t
    if attn_all is None:  # --refine none with a patch-text CAM: nothing to propagate with
        attn_all = torch.zeros(images.shape[0], 1, cams[0].numel(), cams[0].numel(), device=images.device)
    A = propagation_matrix(frozen, attn_all, patch_emb, cfg, S=S, dynamic=dynamic)  # (B, N, N)
    # 3. propagate each class CAM; WeCLIP/CAA first keep only source tokens inside the CAM's boxes
    c = ~rows["is_super"]
    use_box = cfg.refine.endswith(("caa", "rfm"))
    box = box_mask(cams[c], cfg.box_threshold, cfg.box_exclusive_edge) if use_box else None
    refined = refine_cams(cams[c], rows["img"][c], A, box)
    groups = [(refined, rows["img"][c], rows["cls"][c])]
    dual = cfg.cam == "text" and cfg.tsa == "dynamic" and Z is not None
    if dual:  # DiCLIP: Y_st (the adapter's target) from M_st, through the same CAA and one shared PAR
        box_st = box_mask(cam_st, cfg.box_threshold, cfg.box_exclusive_edge) if use_box else None
        groups.append((refine_cams(cam_st, rows["img"], A, box_st), rows["img"], rows["cls"]))
    if with_super:  # SBE: super-class GradCAMs -> CAP prototypes on DINO tokens -> prototype CAMs
        s = rows["is_super"]
        cams_s = minmax(refine_cams(cams[s], rows["img"][s], A)) if cfg.sbe_refine else cams[s]
        dino_feat = dino_features(frozen.dino, images, cfg.norm)
        # Y_s by the class recipe: prototype CAMs min-maxed, then upsampled, bg = 1 - max, PAR, argmax [I]
        groups.append((cap_prototype_cams(cams_s, rows["img"][s], dino_feat, cfg.cap_threshold), rows["img"][s],
                       rows["cls"][s]))
    labels = cams_to_labels(groups, images, cfg, use_par, size)  # Y and Y_s (or Y_st) share one PAR
    result = dict(Y=labels[0], Y_s=labels[1]) if with_super else dict(Y=labels[0])
    if dual:
        result["Y_st"] = labels[1]
    if keep_cams:
        result.update(rows=rows, cams=cams, refined=refined)
    return result


# ----------------------------------------------------------------------------------------------------
# I.7 Caches: DiCLIP's TSA key-value cache (Eqs. 2, 8-13): retrieval, the dynamic adapter, building {K, V}
# ----------------------------------------------------------------------------------------------------

# --- DiCLIP TSA retrieval (Eqs. 2, 11) and the dynamic adapter (Eqs. 12-13) ---

def cache_activation(x, beta: float):
    """Tip-Adapter's activation phi(x) = exp(-beta (1 - x)) on cosine similarities (DiCLIP Eq. 2): phi(1) = 1."""
    return torch.exp(-beta * (1 - x))


def static_cache_cam(feats, keys, values, beta: float):
    """DiCLIP Eq. 2, static retrieval: S = phi(F K^T) V. feats (B, N, D) unit patch features F_v, keys (Nk, D) unit,
    values (Nk, C+1) (column 0 background) -> S (B, N, C+1), before the fg/bg split."""
    return cache_activation(feats @ keys.to(feats.dtype).T, beta) @ values.to(feats.dtype)


def static_cache_fusion(m_p, S, alpha: float, negative: bool = True):
    """DiCLIP Eq. 11, the static CAM. With N = per-map min-max over the patch axis:
      M_f = S[..., 1:],  M_b = S[..., 0]
      M_s = N(M_f) * (1 - N(M_b))     the background (negative) cache suppresses fg where a patch looks like
                                      cached background ("multiplying them" [T]; the sign [I])
      M_st = M_p + alpha N(M_s)
    negative=False is Table IV's "positive cache only": M_s = N(M_f). m_p (B, N, C), S (B, N, C+1) -> (B, N, C)."""
    m_s = minmax(S[..., 1:], dims=(-2,))
    if negative:
        m_s = m_s * (1 - minmax(S[..., :1], dims=(-2,)))
    return m_p + alpha * minmax(m_s, dims=(-2,))


class CacheAdapter(nn.Module):
    """DiCLIP's dynamic adapter (Eqs. 12-13): the retrieval of Eq. 2 as a two-layer MLP,
    Z = phi(F W1^T + b1) W2 + b2, initialised W1 = [K; K_p], W2 = [V; V_p], b1 = b2 = 0 [T], with `n_prompts`
    class-agnostic key/value prompts: K_p random unit vectors (seeded), V_p = 0 [I]. So at initialisation Z equals
    static_cache_cam(F, K, V, beta). Trained by L_dyn = CE(upsampled Z, Y_st); beta stays fixed."""

    def __init__(self, keys, values, n_prompts: int = 92, beta: float = 1.0, seed: int = 0):
        super().__init__()
        nk, D = keys.shape
        k_p = F.normalize(torch.randn(n_prompts, D, generator=torch.Generator().manual_seed(seed)), dim=-1)
        self.beta = float(beta)
        self.w1 = nn.Linear(D, nk + n_prompts)  # weight (Nk+P, D) = [K; K_p]
        self.w2 = nn.Linear(nk + n_prompts, values.shape[1])  # weight (C+1, Nk+P) = [V; V_p]^T
        with torch.no_grad():
            self.w1.weight.copy_(torch.cat([keys.float().cpu(), k_p]))
            self.w2.weight.copy_(torch.cat([values.float().cpu(), torch.zeros(n_prompts, values.shape[1])]).T)
            self.w1.bias.zero_()
            self.w2.bias.zero_()

    def forward(self, feats):  # (B, N, D) -> Z (B, N, C+1) logits
        return self.w2(cache_activation(self.w1(feats), self.beta))


def dynamic_cam(m_p, Z, alpha: float, softmax: bool = True):
    """DiCLIP Eq. 13: M_dt = M_p + alpha N(softmax(Z)[..., 1:]) (softmax over the C+1 classes, then the fg part
    [I]); softmax=False uses the raw fg logits N(Z[..., 1:]). A label-path quantity: Z is detached.
    m_p (B, N, C), Z (B, N, C+1) -> (B, N, C)."""
    Z = Z.detach().float()
    fg = Z.softmax(-1)[..., 1:] if softmax else Z[..., 1:]
    return m_p + alpha * minmax(fg, dims=(-2,))


def cache_features(tokens):
    """The features DiCLIP's cache stores and queries: the calibrated patch tokens, L2-normalised per token, so that
    phi(F K^T) acts on cosines [I] (ExCEL's token-axis normalisation is kept for the CAM only). (B, 1+N, E) ->
    (B, N, E); keys and queries use the same function."""
    return F.normalize(tokens[:, 1:].float(), dim=-1)


# --- DiCLIP TSA offline phase (§III-D.1, Eqs. 8-10): pooled features, keys and values ---

def patch_coverage(label_map, cls, grid):
    """Fraction of each patch covered by class cls[b]: (B, H, W) label maps, (B,) class ids -> (B, N) in [0, 1], by
    area downsampling to the patch grid (h, w) (DiCLIP Eq. 8's m)."""
    on = (label_map == cls.view(-1, 1, 1).to(label_map.device)).float()[:, None]  # (B, 1, H, W)
    return F.adaptive_avg_pool2d(on, grid).flatten(1)  # (B, N)


def mask_average_pool(feats, masks, lo: float = 0.01, hi: float = 0.99):
    """DiCLIP Eq. 8, mask average pooling: f_fg = sum_i m_i F_i / sum_i m_i, f_bg the same with 1 - m, both
    re-L2-normalised [I]. feats (B, N, D), masks (B, N) patch-coverage fractions -> f_fg (B, D), f_bg (B, D),
    valid (B,) bool: False when the foreground covers < lo or > hi of the image (skipped [I])."""
    masks = masks.to(feats.dtype)
    fg = (masks[..., None] * feats).sum(1) / masks.sum(1, keepdim=True).clamp_min(1e-12)
    bg = ((1 - masks)[..., None] * feats).sum(1) / (1 - masks).sum(1, keepdim=True).clamp_min(1e-12)
    frac = masks.mean(1)
    return F.normalize(fg, dim=-1), F.normalize(bg, dim=-1), (frac >= lo) & (frac <= hi)


def _kmeans_keys(x, k: int, seed: int, what: str, log=print0):
    """k unit centroids of the rows of x (n, D) by sklearn KMeans(random_state=seed, n_init=10); fewer rows than k:
    all rows (unit) with a note."""
    if x.shape[0] <= k:
        if x.shape[0] < k:
            log(f"TSA cache: {what} has only {x.shape[0]} features for {k} keys: using all of them as keys")
        return F.normalize(x.float(), dim=-1)
    from sklearn.cluster import KMeans
    km = KMeans(n_clusters=k, random_state=seed, n_init=10).fit(x.double().cpu().numpy())
    return F.normalize(torch.from_numpy(km.cluster_centers_).float(), dim=-1)


def build_kv_cache(fg_feats_by_class: dict, bg_feats, texts_fg, k_per_class: int, k_bg: int, seed: int = 0,
                   log=print0) -> dict:
    """DiCLIP Eqs. 9-10, the key-value cache. fg_feats_by_class {class id 1..C: (n_c, D)} pooled foreground
    features, bg_feats (n, D) pooled background features of all images, texts_fg (C, D) unit class texts.
      keys:   per class, K-means with K_c centroids (sklearn, random_state=seed, n_init=10), L2-normalised; one
              K-means over all background features with K_bg centroids [T*]
      values: a foreground key of class c: one-hot at column c weighted by cos(key, text_c) (Eq. 10);
              a background key: e_0 (plain one-hot, "various background semantics")
    -> dict(keys (Nk, D), values (Nk, C+1), key_class (Nk,) with 0 for background keys)."""
    C = texts_fg.shape[0]
    keys, cls = [], []
    for c in range(1, C + 1):
        x = fg_feats_by_class.get(c)
        if x is None or len(x) == 0:
            log(f"TSA cache: class {c} has no usable foreground feature: it gets no key")
            continue
        kc = _kmeans_keys(torch.as_tensor(x), k_per_class, seed, f"class {c}", log)
        keys.append(kc)
        cls += [c] * len(kc)
    kb = _kmeans_keys(torch.as_tensor(bg_feats), k_bg, seed, "the background", log)
    keys = torch.cat(keys + [kb]) if keys else kb
    key_class = torch.tensor(cls + [0] * len(kb), dtype=torch.long)
    values = torch.zeros(len(keys), C + 1)
    fg = key_class > 0
    texts = F.normalize(texts_fg.float().cpu(), dim=-1)
    values[fg, key_class[fg]] = (keys[fg] * texts[key_class[fg] - 1]).sum(-1)  # cos(key, text of its class)
    values[~fg, 0] = 1.0
    return dict(keys=keys, values=values, key_class=key_class)

def tsa_label_fns(frozen, cfg: Config):
    """What DiCLIP's offline phase (§III-B, §III-D.1) computes on each generated single-class image, as two
    functions of a batch of crops (B, 3, S, S): the features F_v (B, N, D) it stores (cache_features of the
    VCE-calibrated tokens) and the pseudo mask (B, S, S) of the image's one class (the method's own label path:
    VCE -> patch-text CAM -> CAA -> PAR; no cache involved: tsa off). Both read ONE frozen pass (SD + CLIP) per
    batch: the pass feature_fn ran is kept for pseudo_mask_fn on the same images."""
    plain = dataclasses.replace(cfg, tsa="off")
    last = {}

    def frozen_out(images):
        if last.get("images") is not images:
            last.update(images=images, out=frozen_pass(frozen, images, plain))
        return last["out"]

    def feature_fn(images):
        return cache_features(calibrated_tokens(frozen.clip.visual, frozen_out(images), None, 1.0, cfg.svc_norm))

    def pseudo_mask_fn(images, cls):
        labels = F.one_hot(cls - 1, frozen.num_fg).float()
        return make_pseudo_labels(frozen, frozen_out(images), images, labels, plain)["Y"]

    return feature_fn, pseudo_mask_fn


def pool_cache_features(images, cls, feature_fn, pseudo_mask_fn):
    """One batch of DiCLIP's offline phase (Eq. 8): features F_v and pseudo masks of the crops (B, 3, S, S) of
    classes cls (B,), then mask average pooling over each image's patch coverage by its class.
    -> f_fg (B, D), f_bg (B, D), valid (B,) (foreground between 1 % and 99 % of the image)."""
    with torch.no_grad():
        feats = feature_fn(images).float()  # (B, N, D)
        labels = pseudo_mask_fn(images, cls)  # (B, S, S)
    N = feats.shape[1]
    h = math.isqrt(N)
    if h * h != N:
        raise WSSSError(f"TSA cache: feature_fn returned {N} tokens, not a square grid")
    return mask_average_pool(feats, patch_coverage(labels, cls, (h, h)))


# ----------------------------------------------------------------------------------------------------
# I.8 Decoder: the only trained module (WeCLIP's decoder; ExCEL's adapter and LVC relation; DiCLIP's adapter)
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


# --- ExCEL LVC (Eqs. 8-9): the adapter's relation R ---

def lvc_relation(fd, alpha: float = 3.0, beta: float = 1.0, mean: str = "batch"):
    """ExCEL's relation matrix (LVC, Eqs. 8-9; alpha 3, beta 1: Supp. §1): R = alpha (cos(F_d) - beta mean cos(F_d)),
    the cosine between the adapter's per-token features. The mean is ONE scalar over the whole batch and all pairs, as
    upstream (so R depends on the batch), or per image (`mean="image"`). fd (B, D, h, w) or (B, N, D) -> R (B, N, N)
    before any activation: sigmoid(R) is L_div's prediction and CAA's gate, softmax(R masked at < 0) the calibrated
    path's bias (lvc_bias)."""
    f = fd.flatten(2).transpose(1, 2) if fd.dim() == 4 else fd  # (B, N, D)
    f = F.normalize(f.float(), dim=-1)
    cos = f @ f.transpose(1, 2)  # (B, N, N)
    m = cos.mean() if mean == "batch" else cos.mean((1, 2), keepdim=True)
    return alpha * (cos - beta * m)


def lvc_bias(R):
    """ExCEL's LVC attention term: softmax_row(R) with R_ij < 0 masked to -inf (clip_surgery_model.py:128-137).
    The diagonal R_ii = alpha (1 - beta mean) is >= 0 for beta <= 1; it is kept in any case, so no row is
    ever all -inf. (B, N, N) -> (B, N, N), rows sum to 1."""
    eye = torch.eye(R.shape[-1], dtype=torch.bool, device=R.device)
    return R.float().masked_fill((R < 0) & ~eye, float("-inf")).softmax(-1)


# --- shared: the decoder (WeCLIP), built per method ---

class SegDecoder(nn.Module):
    """WeCLIP decoder. Fuse head: per-block MLP (D -> dim -> dim) over the patch tokens of CLIP blocks
    1..L-1, concatenated, 1x1 conv -> dim, Dropout2d -> F (B, dim, h, w). Then `layers` pre-LN transformer
    blocks and a 1x1 conv to the K classes. Affinity head S = sigmoid(F^T F) (B, N, N), which the dynamic
    RFM uses and the affinity loss trains. VOC + ViT-B/16: 5,985,045 parameters, as upstream.
    ExCEL builds the same module on all 12 blocks: its "adapter" is this fuse head (F = F_d, Supp. §1) and its
    decoder these blocks; relation "cos" gives ExCEL's R (lvc_relation) and S = sigmoid(R): 6,313,237
    parameters for VOC, as upstream."""

    def __init__(self, in_dim: int, n_feats: int, num_classes: int, dim=256, layers=3, heads=8, mlp=1024,
                 dropout=0.1, relation: str = "dot", alpha: float = 3.0, beta: float = 1.0, rel_mean: str = "batch"):
        super().__init__()
        self.relation, self.alpha, self.beta, self.rel_mean = relation, alpha, beta, rel_mean
        self.cache_adapter = None  # DiCLIP: a CacheAdapter, trained beside the decoder (see build_decoder)
        self.mlps = nn.ModuleList(nn.Sequential(nn.Linear(in_dim, dim), nn.ReLU(), nn.Linear(dim, dim))
                                  for _ in range(n_feats))
        self.fuse = nn.Conv2d(n_feats * dim, dim, 1)
        self.dropout = nn.Dropout2d(dropout)
        self.blocks = nn.ModuleList(DecoderBlock(dim, heads, mlp) for _ in range(layers))
        self.classifier = nn.Conv2d(dim, num_classes, 1)

    def forward(self, feats, grid, return_relation: bool = False, cache_feats=None):
        """feats: list of (B, N, D) patch tokens; grid (h, w) -> logits (B, K, h, w), S (B, N, N)
        [and R (B, N, N), S = sigmoid(R)] [and, given cache_feats (B, N, E), the cache adapter's Z (B, N, C+1)]."""
        (h, w), B = grid, feats[0].shape[0]
        x = torch.cat([mlp(f.float()) for mlp, f in zip(self.mlps, feats)], -1)  # (B, N, n*dim)
        x = x.transpose(1, 2).reshape(B, -1, h, w)  # (B, n*dim, h, w)
        f = self.dropout(self.fuse(x))  # (B, dim, h, w): F
        t = f.flatten(2).transpose(1, 2)  # (B, N, dim)
        for blk in self.blocks:
            t = blk(t)
        logits = self.classifier(t.transpose(1, 2).reshape(B, -1, h, w))  # (B, K, h, w)
        with fp32(f.device):  # the relation feeds the label path (gating, LVC bias): fp32 even under AMP
            if self.relation == "cos":  # ExCEL: R = alpha (cos(F_d) - beta mean)
                R = lvc_relation(f.float(), self.alpha, self.beta, self.rel_mean)
            else:  # WeCLIP: R = F^T F
                fn = f.flatten(2).float()  # (B, dim, N)
                R = fn.transpose(1, 2) @ fn  # (B, N, N)
            S = torch.sigmoid(R)
        if cache_feats is not None:
            return logits, S, R, self.cache_adapter(cache_feats)
        return (logits, S, R) if return_relation else (logits, S)


def build_decoder(cfg: Config, frozen: Frozen):
    """WeCLIP/CD-CLIP: on blocks 1..L-1 (the last block's tokens are GradCAM's). ExCEL: on all L blocks. DiCLIP
    adds its cache adapter when the cache is loaded (training, label path)."""
    width = frozen.clip.visual.conv1.out_channels
    n_feats = frozen.num_blocks if cfg.cam == "text" else frozen.num_blocks - 1
    dec = SegDecoder(width, n_feats, frozen.num_fg + 1, cfg.dec_dim, cfg.dec_layers, cfg.dec_heads, cfg.dec_mlp,
                     cfg.dec_dropout, cfg.relation, cfg.lvc_alpha, cfg.lvc_beta, cfg.lvc_mean)
    if cfg.tsa == "dynamic" and frozen.tsa is not None:  # DiCLIP's adapter, initialised from the cache (Eq. 12);
        # at test time (no cache loaded) the decoder is built alone: the adapter only makes training labels
        dec.cache_adapter = CacheAdapter(frozen.tsa["keys"], frozen.tsa["values"], cfg.cache_prompts, cfg.cache_beta,
                                         seed=cfg.seed)
    return dec


def head_outputs(model, out: dict, frozen, cfg: Config):
    """The trained head on one frozen pass: (logits, S, R, Z or None). DiCLIP's adapter reads the calibrated
    tokens (cache_features); everything else reads the original path's per-block tokens."""
    if cfg.tsa == "dynamic":
        tokens = calibrated_tokens(frozen.clip.visual, out, None, 1.0, cfg.svc_norm)
        return model(out["feats"], out["grid"], return_relation=True, cache_feats=cache_features(tokens))
    return (*model(out["feats"], out["grid"], return_relation=True), None)


# ----------------------------------------------------------------------------------------------------
# I.9 Losses: balanced CE (L_seg), affinity loss (WeCLIP L_aff, ExCEL L_div), gated Dice (CD-CLIP L_b)
# ----------------------------------------------------------------------------------------------------

def balanced_ce_loss(logits, labels, one_kind: str = "mean"):
    """WeCLIP L_seg = 1/2 CE over background pixels + 1/2 CE over foreground pixels (255 ignored); logits are
    upsampled (bilinear) to the labels. A batch without foreground (or without background) pixels: WeCLIP's
    mean of an empty set is NaN; `one_kind` "mean" takes the term that exists (1x) [upstream bug fixed], "half"
    gives 1/2 of it, as ExCEL's loss does (its counts carry +1e-6, so the empty term is 0) [code].
    logits (B, K, h, w), labels (B, H, W) -> scalar."""
    if logits.shape[-2:] != labels.shape[-2:]:
        logits = F.interpolate(logits, size=labels.shape[-2:], mode="bilinear", align_corners=False)
    ce = F.cross_entropy(logits.float(), labels, ignore_index=IGNORE, reduction="none")  # (B, H, W)
    # L_seg = 1/2 CE(bg pixels) + 1/2 CE(fg pixels)
    groups = [labels == 0, (labels != 0) & (labels != IGNORE)]
    terms = [ce[g].mean() for g in groups if g.any()]
    if not terms:
        return logits.sum() * 0.0
    return sum(terms) / (2 if one_kind == "half" else len(terms))


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


# --- CD-CLIP SBE: the gated super-class Dice loss L_b ---

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
# I.10 Evaluation: confusion matrix and mIoU, multi-scale + flip inference, the pseudo-labels of one image
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


def resize_long_side(image, long_side: int, min_side: int = 1):
    """(B, 3, H, W) -> long side `long_side` (WeCLIP test: int(h r), int(w r), bilinear, align_corners=False).
    The short side stays >= min_side (callers pass one CLIP patch: a 2000x20 image would otherwise get no token
    row at all; such an image is stretched to one patch instead)."""
    H, W = image.shape[-2:]
    r = long_side / max(H, W)
    size = (max(min_side, int(H * r)), max(min_side, int(W * r)))
    return image if size == (H, W) else F.interpolate(image, size=size, mode="bilinear", align_corners=False)


def test_resize(image, cfg: Config, s: float = 1.0, min_side: int = 1):
    """The test-time input at scale s: the long side to s * eval_long_side (WeCLIP), or a square of side
    s * eval_long_side whatever the aspect ratio (ExCEL: 320 s). The short side keeps at least `min_side` pixels
    (one CLIP patch), so very wide or tall images still give a token grid."""
    if cfg.eval_resize == "long":
        x = resize_long_side(image, cfg.eval_long_side, min_side)
        if s == 1:
            return x
        y = F.interpolate(x, scale_factor=s, mode="bilinear", align_corners=False)
        if min(y.shape[-2:]) >= min_side:
            return y
        size = tuple(max(min_side, int(d * s)) for d in x.shape[-2:])  # a scale < 1 keeps one patch too
        return F.interpolate(x, size=size, mode="bilinear", align_corners=False)
    side = max(min_side, int(cfg.eval_long_side * s))
    return image if image.shape[-2:] == (side, side) else \
        F.interpolate(image, size=(side, side), mode="bilinear", align_corners=False)


def predict_logits(decoder, frozen: Frozen, image, cfg: Config, size=None):
    """Multi-scale + flip test. WeCLIP ("long"): the long side resized to eval_long_side, then each scale; the
    logits of the image and of its un-flipped flip are averaged and resized to the scale-1 token grid; the
    mean over scales is upsampled to `size` (default: the input size). ExCEL ("square"): a square of side
    320 s per scale, each scale's logits resized to `size` and averaged; its VOC script uses the un-flipped
    logits alone at s = 1 (eval_flip_at_1 off). image (1, 3, H, W) -> logits (1, K, H, W)."""
    size = size or image.shape[-2:]
    p = frozen.patch
    x0 = test_resize(image, cfg, 1.0, p)
    grid = (x0.shape[-2] // p, x0.shape[-1] // p)
    acc = 0
    for s in cfg.eval_scales:
        x = x0 if s == 1 else test_resize(image, cfg, s, p)
        flip = cfg.eval_flip and (s != 1 or cfg.eval_flip_at_1)
        x = torch.cat([x, x.flip(-1)]) if flip else x
        with fp32(x.device):
            out = clip_image_forward(frozen.clip, x, full=cfg.cam == "text")
        logits, _ = decoder(out["feats"], out["grid"])
        logits = (logits[:1] + logits[1:].flip(-1)) / 2 if flip else logits
        acc = acc + F.interpolate(logits.float(), size=grid if cfg.eval_resize == "long" else size, mode="bilinear",
                                  align_corners=False)
    acc = acc / len(cfg.eval_scales)
    return acc if cfg.eval_resize == "square" else F.interpolate(acc, size=size, mode="bilinear", align_corners=False)


def oracle_affinity(gt, grid, num_classes: int):
    """DIAGNOSTICS ONLY (it reads the true mask): the perfect class-averaging affinity of one image. Each token
    takes the majority class of its patch; A_ij = 1 / |{k: y_k = y_i}| when y_j = y_i, else 0, so A . m replaces
    every token's CAM value by the mean over all tokens of its true class: the best any propagation matrix can
    do for a CAM that is right somewhere on each object. gt (H, W) ids (255 = void, counted as background) ->
    (1, N, N), rows sum to 1."""
    one_hot = F.one_hot(torch.where(gt.long() < num_classes, gt.long(), 0), num_classes)  # (H, W, K)
    y = F.adaptive_avg_pool2d(one_hot.permute(2, 0, 1)[None].float(), grid)[0].argmax(0).flatten()  # (N,)
    same = (y[:, None] == y[None]).float()  # (N, N)
    return (same / same.sum(1, keepdim=True))[None]


def label_variants(frozen: Frozen, image, labels, cfg: Config, decoder=None, gt=None,
                   lvc_cam: bool = False) -> dict:
    """Pseudo-labels of one full image at its GT size, from the image-level labels: raw CAM, after the
    method's refinement, after PAR (the last is what training uses); plus a CAM heat-map for overlays.
    With a decoder, RFM runs in its dynamic mode with the decoder affinity (ExCEL: the sigmoid(R)-gated CAA)
    and the box threshold is the validation one. ExCEL's CAM stays the STATIC one, as upstream's in-training
    validation computes it (validatation_engine: no ex_feats), unless `lvc_cam` (its infer_lam with a trained
    model, `cams --ckpt`: the dynamic LVC CAM). DiCLIP's M_dt reads the adapter's Z in both [I]."""
    size = image.shape[-2:]
    x = test_resize(image, cfg, 1.0, frozen.patch)
    bias = None
    Z = None
    with torch.no_grad(), fp32(x.device):
        out = frozen_pass(frozen, x, cfg)
        S = R = None
        if decoder is not None:
            _, S, R, Z = head_outputs(decoder, out, frozen, cfg)
            bias = lvc_bias(R) if cfg.lvc and lvc_cam else None
            if cfg.val_box_threshold:
                cfg = dataclasses.replace(cfg, box_threshold=cfg.val_box_threshold)
    res = make_pseudo_labels(frozen, out, x, labels, cfg, S=S, dynamic=decoder is not None, with_super=False,
                             size=size, keep_cams=True, bias=bias, Z=Z)
    rows, c = res["rows"], ~res["rows"]["is_super"]
    img, cls = rows["img"][c], rows["cls"][c]
    heat = F.interpolate(minmax(res["refined"]).amax(0)[None, None], size=size, mode="bilinear",
                         align_corners=False)[0]  # (1, H, W)
    out_maps = {"cam": cams_to_label(res["cams"][c], img, cls, x, cfg, use_par=False, size=size),
                "refined": cams_to_label(res["refined"], img, cls, x, cfg, use_par=False, size=size),
                "refined+PAR": res["Y"], "cam_map": heat}
    if gt is not None:  # the ceiling: the same CAMs and boxes, propagated by the perfect affinity instead
        A = oracle_affinity(gt, out["grid"], len(dataset_info(cfg)["classes"]))
        box = box_mask(res["cams"][c], cfg.box_threshold, cfg.box_exclusive_edge) \
            if cfg.refine.endswith(("caa", "rfm")) else None
        with fp32(x.device):
            ideal = refine_cams(res["cams"][c], torch.zeros_like(img), A, box)
            out_maps["oracle"] = cams_to_label(ideal, img, cls, x, cfg, use_par=False, size=size)
            out_maps["oracle+PAR"] = cams_to_label(ideal, img, cls, x, cfg, use_par=True, size=size)
    return out_maps


# ----------------------------------------------------------------------------------------------------
# I.11 Training: the lr schedule, one step's losses, the step, the loop
# ----------------------------------------------------------------------------------------------------

def lr_at(step: int, cfg: Config) -> float:
    """WeCLIP's schedule at 0-based step k: linear warm-up from warmup_ratio over warmup_steps, then poly:
    lr (1 - k/max_steps)^poly_power. cfg.lr is the *effective* decoder lr (upstream: 2e-4 with a x10 group)."""
    if step < cfg.warmup_steps:
        return cfg.lr * (1 - (1 - step / cfg.warmup_steps) * (1 - cfg.warmup_ratio))
    return cfg.lr * (1 - step / cfg.max_steps) ** cfg.poly_power


def param_groups(decoder, cfg: Config) -> list:
    """AdamW groups: the decoder (and ExCEL's adapter, its fuse head) at lr; DiCLIP's cache adapter at adapter_lr
    (`lr_scale` is the group's share of the scheduled lr)."""
    adapter = list(decoder.cache_adapter.parameters()) if decoder.cache_adapter is not None else []
    ids = {id(p) for p in adapter}
    groups = [dict(params=[p for p in decoder.parameters() if id(p) not in ids], lr_scale=1.0)]
    if adapter:
        groups.append(dict(params=adapter, lr_scale=(cfg.adapter_lr or cfg.lr) / cfg.lr))
    return groups


def autocast_ctx(cfg: Config, device):
    """fp32 on CPU; bf16 (or fp16 with a GradScaler) autocast on CUDA."""
    if device.type != "cuda" or cfg.amp == "off":
        return nullcontext(), None
    dtype = torch.bfloat16 if cfg.amp == "bf16" or (cfg.amp == "auto" and torch.cuda.is_bf16_supported()) \
        else torch.float16
    return torch.autocast("cuda", dtype=dtype), dtype


def compute_losses(model, frozen: Frozen, images, labels, cfg: Config, step: int):
    """One batch of the algorithm: frozen CLIP pass, decoder, pseudo-labels (no gradient into the decoder),
    L = L_seg + lambda_aff L_aff (WeCLIP; ExCEL's L_div) + lambda_b L_b (CD-CLIP). Returns (loss, float parts,
    labels). Under AMP only the decoder runs in reduced precision: the frozen pass and the label path run in
    fp32 with autocast disabled (in bf16 CDA's refined maps collapse to a few dozen levels), as upstream."""
    out = frozen_pass(frozen, images, cfg)  # fp32, no grad ([DiCLIP: SD attention, ACR,] CLIP's two paths)
    logits, S, R, Z = head_outputs(model, out, frozen, cfg)
    # the label path sees the decoder only through a detached S (and R): pseudo-labels never carry gradient
    dynamic = step >= cfg.rfm_dynamic_after  # WeCLIP counts every forward call, validation too [upstream bug fixed]
    # ExCEL's dynamic CAM (LVC) from the same switch step: softmax(R) biases the calibrated path
    bias = lvc_bias(R.detach().float()) if cfg.lvc and dynamic else None
    pl = make_pseudo_labels(frozen, out, images, labels, cfg, S=S.detach().float(), dynamic=dynamic, bias=bias,
                            Z=None if Z is None else Z.detach())
    loss_seg = balanced_ce_loss(logits.float(), pl["Y"], cfg.seg_one_kind)
    loss, parts = loss_seg, dict(seg=loss_seg.item())
    if Z is not None and cfg.lambda_dyn > 0:  # DiCLIP L_dyn = CE(upsampled Z, Y_st): the adapter learns from M_st
        h, w = out["grid"]
        z = Z.float().transpose(1, 2).reshape(Z.shape[0], -1, h, w)  # (B, C+1, h, w)
        z = F.interpolate(z, size=pl["Y_st"].shape[-2:], mode="bilinear", align_corners=False)
        loss_dyn = F.cross_entropy(z, pl["Y_st"], ignore_index=IGNORE)
        loss, parts["dyn"] = loss + cfg.lambda_dyn * loss_dyn, loss_dyn.item()
    if cfg.lambda_aff > 0:
        target = pl["Y"]
        if cfg.aff_self_after and step >= cfg.aff_self_after:  # ExCEL VOC: the model's own prediction from 24k
            target = F.interpolate(logits.detach().float(), size=target.shape[-2:], mode="bilinear",
                                   align_corners=False).argmax(1)
        loss_aff = affinity_loss(S.float(), affinity_labels(target, out["grid"], cfg.aff_radius))
        loss, parts["aff"] = loss + cfg.lambda_aff * loss_aff, loss_aff.item()
    if cfg.lambda_b > 0:
        loss_b, parts["gated"] = boundary_loss(logits, pl["Y_s"], labels, frozen, cfg)
        loss, parts["b"] = loss + cfg.lambda_b * loss_b, loss_b.item()
    return loss, parts, pl


def train_step(model, frozen, optimizer, scaler, batch: dict, cfg: Config, step: int, ctx=nullcontext()) -> tuple:
    """One step of the algorithm at 0-based `step`: the scheduled lr (each parameter group at its share), the
    losses of one batch (compute_losses: frozen pass, pseudo-labels, decoder, L), backward, AdamW. Under DDP the
    ranks agree (Part II's agree) that the forward pass worked everywhere before any backward, so one failing rank
    cannot leave the others waiting in the gradient all-reduce. -> (loss, parts, pseudo-labels, lr)."""
    lr = lr_at(step, cfg)
    for group in optimizer.param_groups:
        group["lr"] = lr * group["lr_scale"]
    images = batch["image"].to(frozen.device, non_blocking=True)
    labels = batch["label"].to(frozen.device, non_blocking=True)
    failure = None
    try:
        with ctx:  # autocast for the decoder; the frozen pass and the label path stay fp32 (compute_losses)
            loss, parts, pl = compute_losses(model, frozen, images, labels, cfg, step)
        if not torch.isfinite(loss):
            raise WSSSError(f"loss became {loss.item()} at step {step}: lower --lr or check the data")
    except Exception as e:  # one rank's batch (NaN, a label-path error): it reports, the others stop
        failure = e
    agree(failure)
    optimizer.zero_grad(set_to_none=True)
    if scaler:  # fp16 autocast: scaled gradients
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
    else:
        loss.backward()
        optimizer.step()
    return loss, parts, pl, lr


def train_loop(model, frozen, optimizer, scaler, cfg: Config, start: int, batches, ctx=nullcontext(),
               after_step=None):
    """The training loop: steps start .. max_steps - 1, one batch each from `batches` (Part II's loader, which
    also stops the run cleanly on Ctrl-C), one train_step each. `after_step(done, batch, loss, parts, pl, lr)` is
    Part II's logging, validation and checkpointing; it changes nothing the next step computes."""
    for step in range(start, cfg.max_steps):
        batch = next(batches)
        loss, parts, pl, lr = train_step(model, frozen, optimizer, scaler, batch, cfg, step, ctx)
        if after_step is not None:
            after_step(step + 1, batch, loss, parts, pl, lr)


# ====================================================================================================
# PART II: THE HARNESS. Command line, validation, files, caches, run folders, locks, signals, DDP agreement,
# model loading, the demo worlds, bench and compare. Nothing below changes a pseudo-label: every equation
# is in Part I.
# ====================================================================================================
# ----------------------------------------------------------------------------------------------------
# II.1 Command line and validation: flags generated from Config, presets, one table of rules
# ----------------------------------------------------------------------------------------------------

@dataclass
class Config(MethodConfig):
    """MethodConfig plus the harness's settings: where data, runs and caches live, devices, logging and
    checkpoints, test-time DenseCRF, the demo. Only `tiny`, `demo_model`, ExCEL's input files and DiCLIP's cache
    source (which choose the models and inputs the methods read) affect anything a checkpoint or a cache holds."""
    # --- run ---
    data_root: str = ""                 # dataset folder: VOC layout, or your own (--dataset custom); env WSSS_DATA_ROOT
    labels_file: str = setting("", RUN)  # VOC/COCO image-level labels from WeCLIP's cls_labels_onehot.npy (no masks)
    out_dir: str = ""                   # run folder; derived: runs/<method>-<dataset>
    overwrite: bool = False             # train: replace the run in --out-dir (else refuse; --resume continues it)
    cache_dir: str = ""                 # caches (labels, data, toy CLIP, banks); env WSSS_CACHE or ~/.cache/wsss
    demo: bool = False                  # synthetic world + a demo CLIP + short schedule (see DEMO)
    demo_images: int = 240              # images in the demo's synthetic train split (val gets a quarter)
    tiny: bool = setting(False, LABELS | IMAGES | MODEL)  # tiny models of the same library classes, random weights
    demo_model: str = setting("toy", LABELS | MODEL)  # demo CLIP: planted (hand-set; --demo's) | toy (pre-trained)
    device: str = "auto"                # auto | cpu | cuda | cuda:N
    amp: str = "auto"                   # auto (bf16 if supported on CUDA, else fp16) | bf16 | fp16 | off; CPU: off
    num_workers: int = 2                # DataLoader workers (WeCLIP: 10)
    # --- method inputs from files ---
    attr_bank: str = setting("", LABELS)  # ExCEL's attribute bank .pth [centroids (E x B), flags (C x B)]
    descriptions: str = setting("", LABELS)  # ExCEL's description JSON {class: [sentences]} (or --attr-bank)
    cache_source: str = setting("sd", LABELS | IMAGES)  # DiCLIP cache images: sd | synthetic (the demo's stand-in)
    # --- evaluation / logging ---
    eval_every: int = 2000              # validate every n steps (0: only at the end)
    # off by default (pydensecrf2 is an optional install), though CD-CLIP's reported numbers use it [code≠paper]
    crf: bool = False                   # DenseCRF post-processing (needs pydensecrf2)
    crf_iters: int = 10                 # DenseCRF mean-field iterations (WeCLIP utils/dcrf.py)
    crf_pos_xy: float = 3.0             # Gaussian kernel: spatial std (pixels)
    crf_pos_w: float = 3.0              # Gaussian kernel: compatibility weight
    crf_bi_xy: float = 64.0             # bilateral kernel: spatial std (pixels)
    crf_bi_rgb: float = 5.0             # bilateral kernel: colour std (0..255)
    crf_bi_w: float = 4.0               # bilateral kernel: compatibility weight
    log_every: int = 200                # print/log a line every n steps
    save_every: int = 2000              # checkpoint every n steps (and at the end)
    resume: str = ""                    # checkpoint to continue from
    overfit_batch: bool = setting(False, RUN)  # debug: train on the first batch only (the loss should go to 0)
    ckpt: str = ""                      # checkpoint for `eval` (derived: <out_dir>/ckpt.pt)
    save_vis: str = ""                  # `eval`: folder for PNG overlays
    num_vis: int = 8                    # overlays written with --save-vis
    save_pseudo: str = ""               # `cams`: folder for the pseudo-label PNGs (to train another segmenter on)
    images: str = ""                    # `predict`: an image, a folder of images, or a glob ("photos/*.jpg")
    out: str = ""                       # `predict`: folder for the predicted masks (index PNGs, original size)
    cam_split: str = "train"            # `cams`: split whose pseudo-labels are scored (the papers' "M": VOC train)
    bench_repeats: int = 3              # `bench`: timed repeats per stage (median reported, after one warm-up)
    max_images: int = 0                 # evaluate / measure on at most this many images (0: all)
    eval_cams: bool = False             # the final evaluation also scores the pseudo-labels (always on with --demo)
    compare_methods: str = "weclip,cdclip,excel,diclip"  # `compare`: the methods run side by side
    # --- synthetic world / toy CLIP (for --demo) ---
    num_images: int = 200               # `synth`: number of train images (val gets a quarter)
    image_size: int = 64                # `synth`: image side
    layout: str = "voc"                 # `synth`: voc (VOC folders, masks) | custom (your-own-data format, val masks)
    toy_steps: int = 160                # `pretrain-toy`: contrastive steps (~90 s on 2 CPU cores)
    toy_batch: int = 128                # `pretrain-toy`: image-caption pairs per step
    toy_lr: float = 2e-3                # `pretrain-toy`: peak AdamW lr
    toy_weight_decay: float = 0.1       # `pretrain-toy`: AdamW weight decay (CLIP's)
    toy_warmup: float = 0.1             # `pretrain-toy`: fraction of the steps spent in linear warm-up, then cosine
    toy_seed: int = 1                   # `pretrain-toy`: seed of the toy CLIP (one toy CLIP for every method's demo)


def fields_affecting(what: Affects) -> tuple:
    """The names of the Config fields tagged with any flag of `what` (see Affects): the one source of truth for
    which settings a checkpoint, a resume and DiCLIP's cache depend on."""
    return tuple(f.name for f in fields(Config) if f.metadata.get("affects", Affects.NOTHING) & what)


# `eval` refuses a checkpoint whose model-shaping settings differ; `--resume` refuses any change of a setting that
# affects the labels, the model or the run (except max_steps: a run may be extended); DiCLIP's cache is keyed by
# the settings that affect the labels and the generated images, its image folder by the latter alone.
MODEL_KEYS = fields_affecting(MODEL)
RESUME_KEYS = tuple(k for k in fields_affecting(LABELS | IMAGES | MODEL | RUN) if k != "max_steps")
TSA_KEYS = fields_affecting(LABELS | IMAGES)
TSA_IMAGE_KEYS = fields_affecting(IMAGES)


# Which commands read which flags, shown as the groups of `wsss.py COMMAND --help`: each command's parser holds
# exactly the flags it reads, so a flag it would ignore is one line (see _unknown_argument), not silently dropped.
# Every Config field appears once below, mapped to the commands that read it (space-separated names); the sets
# name what the commands share. "own" is the group of the flags one command alone reads (titled by the command).
_T = "train compare"          # a training run (compare passes its flags on to each method's `train`)
_B = _T + " bench"            # one training step: its losses, lr and batch (bench times one)
_L = _B + " cams cache eval"  # the label path: a pseudo-label, DiCLIP's cache (eval: --save-vis draws the labels)
_M = _B + " cams eval"        # the decoder's shape (eval and cams --ckpt load a decoder)
_E = _T + " eval predict"     # the decoder's test-time prediction
_D = _T + " cams cache bench"  # --demo's assets, made on first use: the synthetic data and the toy CLIP
FLAG_GROUPS = {
    "own": dict(cam_split="cams", save_pseudo="cams", images="predict", out="predict", num_images="synth",
                image_size="synth", layout="synth", bench_repeats="bench", compare_methods="compare"),
    "method and data": dict(method=_L, dataset=_L, data_root=_L + " synth predict", train_split=_T,
                            val_split=_T + " eval", labels_file=_T + " cams", seed=_L + " synth", upstream=_L),
    "demo: the synthetic world and its toy CLIP": dict(
        demo=_D + " eval", demo_images=_D, demo_model=_L, tiny=_L, **dict.fromkeys(
            ("toy_steps", "toy_batch", "toy_lr", "toy_weight_decay", "toy_warmup", "toy_seed"), _D + " pretrain-toy")),
    "run folder, caches, devices": dict(out_dir=_T + " eval", overwrite=_T, resume=_T, ckpt=_T + " eval cams predict",
                                        log_every=_T, save_every=_T, cache_dir=_L + " pretrain-toy",
                                        device=_L + " predict pretrain-toy", amp=_T, num_workers=_T),
    "training schedule": dict(crop_size=_L, scale_min=_T, scale_max=_T, batch_size=_B, max_steps=_T, lr=_B,
                              **dict.fromkeys(("weight_decay", "beta1", "beta2", "warmup_steps", "warmup_ratio",
                                               "poly_power", "overfit_batch"), _T)),
    "decoder and losses": dict(dec_dim=_M, dec_layers=_M, dec_heads=_M, dec_mlp=_M, dec_dropout=_B, seg_one_kind=_B,
                               lambda_aff=_B, aff_radius=_B),
    "evaluation": dict(eval_every=_T, eval_cams=_T, max_images=_T + " eval cams", save_vis=_T + " eval cams predict",
                       num_vis=_T + " eval cams", **dict.fromkeys(
                           ("eval_long_side", "eval_resize", "eval_scales", "eval_flip", "eval_flip_at_1", "crf",
                            "crf_iters", "crf_pos_xy", "crf_pos_w", "crf_bi_xy", "crf_bi_rgb", "crf_bi_w"), _E)),
    "frozen models": dict(clip_model=_L, clip_pretrained=_L + " pretrain-toy", dino_model=_B, template=_L,
                          norm=_L + " pretrain-toy"),
    "pseudo-labels (all methods): CAM, refinement, PAR": dict.fromkeys(
        ("cam_logit_scale", "bg_pow", "cam_contrast_floor", "refine", "attn_layers", "rfm_dynamic_layers",
         "rfm_dynamic_after", "power", "box_threshold", "box_exclusive_edge", "val_box_threshold", "par_iters",
         "par_dilations", "par_w1", "par_w2"), _L),
    "CD-CLIP: CDA, SBE": dict(cda_tau=_L, cda_minmax=_L, cda_bg_texts=_L, superclasses=_L, sbe_refine=_L,
                              cap_threshold=_L, cp_area_floor=_B, sbe_gate=_B, lambda_b=_B),
    "ExCEL: patch-text CAM, SVC, TSE": dict.fromkeys(
        ("cam", "cam_sim", "svc_layers", "svc_attn", "svc_heads", "svc_norm", "caa_attn_mix", "tse", "tse_keep",
         "tse_lambda", "tse_clusters", "tse_drop", "attr_bank", "descriptions"), _L),
    "ExCEL: LVC, the adapter": dict(lvc=_L, relation=_L, lvc_alpha=_L, lvc_beta=_L, lvc_mean=_L, adapter_feats=_L,
                                    aff_self_after=_B),
    "DiCLIP: VCE (Stable Diffusion's attention, ACR)": dict.fromkeys(
        ("vce", "sd_model", "sd_size", "sd_timestep", "sd_layers", "acr_k", "acr_delta", "acr_rounds", "acr_variant",
         "acr_iters", "vce_layers", "vce_weight", "vce_fusion"), _L),
    "DiCLIP: TSA cache": dict(**dict.fromkeys(
        ("tsa", "cache_source", "cache_alpha", "cache_beta", "cache_negative", "cache_dyn_softmax", "cache_per_class",
         "cache_bg", "cache_prompts", "cache_images_per_class", "cache_image_size", "cache_steps", "cache_guidance",
         "cache_scheduler", "cache_prompt"), _L), lambda_dyn=_B, adapter_lr=_T),
}


def command_groups(command: str) -> dict:
    """The flags `command` reads, by help group (FLAG_GROUPS, in its order; empty groups left out)."""
    groups = {}
    for title, members in FLAG_GROUPS.items():
        names = [name for name, readers in members.items() if command in readers.split()]
        if names:
            groups[command if title == "own" else title] = names
    return groups


def flag_readers() -> dict:
    """Every option string (--crop-size, and --no-X of a switch) -> the commands that read its field."""
    readers, switches = {}, {f.name for f in fields(Config) if f.type in ("bool", bool)}
    for members in FLAG_GROUPS.values():
        for name, commands in members.items():
            for option in (_flag(name), "--no-" + _flag(name)[2:]) if name in switches else (_flag(name),):
                readers[option] = commands.split()
    return readers


class _Parser(argparse.ArgumentParser):
    """argparse whose errors (a value of the wrong type, a missing value) are WSSSErrors: one line from main,
    exit status 2, no usage dump."""

    def error(self, message):
        raise WSSSError(message)


class _HelpFormatter(argparse.HelpFormatter):
    """Compact help: a switch is one option (--[no-]eval-flip), help text from column 30; the description's
    paragraphs kept apart, the examples as written."""

    def __init__(self, prog):
        super().__init__(prog, max_help_position=30)

    def _fill_text(self, text, width, indent):  # each paragraph filled on its own; the examples as written
        import textwrap
        return "\n\n".join(p if p.startswith("examples:") else
                            textwrap.fill(" ".join(p.split()), width, initial_indent=indent, subsequent_indent=indent,
                                          break_on_hyphens=False)
                            for p in text.split("\n\n"))

    def _split_lines(self, text, width):  # never inside a flag or a word: --rfm-dynamic-after stays whole
        import textwrap
        return textwrap.wrap(" ".join(text.split()), width, break_on_hyphens=False)

    def _format_action_invocation(self, action):
        if isinstance(action, argparse.BooleanOptionalAction):
            return "--[no-]" + action.option_strings[0][2:]
        return super()._format_action_invocation(action)


def parse_flags(argv, command: str = "train") -> dict:
    """The flags of argv that `command` reads -> {field: value} (only those given). An unknown flag, a flag of
    another command or an ill-typed value is a WSSSError naming it (with the closest flag for a typo)."""
    ns, extra = build_parser(command).parse_known_args(list(argv))
    if extra:
        raise WSSSError(_unknown_argument(extra, command))
    return vars(ns)


def parse_config(argv, command: str = "train") -> Config:
    """CLI flags generated from Config's fields, those `command` reads (FLAG_GROUPS). Precedence: field default <
    dataset preset < method preset < --demo < --upstream < explicit flags. Errors are WSSSErrors (main: one line,
    exit status 2). --help prints the command's flags with the defaults of the presets the other flags choose
    (`train --method cdclip --help` shows CD-CLIP's), then exits with status 0."""
    argv = list(argv)
    if "-h" in argv or "--help" in argv:
        rest = [a for a in argv if a not in ("-h", "--help")]
        build_parser(command, _help_values(rest, command), rest).print_help()
        raise SystemExit(0)
    given = parse_flags(argv, command)
    try:
        cfg = make_config(**given)
    except WSSSError:  # eval, predict, cams --ckpt: the flags are checked on the run's settings, if there is a run
        cfg = _checkpoint_base(command, given)
        if cfg is None:
            raise
    cfg._given = frozenset(given)  # the flags set explicitly (not a field: never saved or compared)
    return cfg


def _checkpoint_base(command: str, given: dict):
    """For a command that starts from a trained run's checkpoint (eval, predict, cams --ckpt): the flags as given,
    unvalidated, when the checkpoint they name exists; the command builds its settings from that checkpoint with
    checkpoint_config, which validates the flags on top of the run's settings (`eval --method excel --ckpt X` needs
    no attribute bank, as the defaults' VOC would; `--superclasses 3` is the synthetic world's). Else None."""
    if command not in ("eval", "predict") and not (command == "cams" and "ckpt" in given):
        return None
    try:
        cfg = derive_fields(Config(**preset_values(given)))
    except WSSSError:
        return None
    return cfg if Path(cfg.ckpt).is_file() else None


_PATH_FIELDS = {"data_root", "labels_file", "out_dir", "cache_dir", "resume", "ckpt", "save_vis", "save_pseudo",
                "images", "out", "attr_bank", "descriptions"}


def build_parser(command: str = "train", values: dict = None, given_argv=()) -> argparse.ArgumentParser:
    """The parser of one command: its flags (command_groups) in argparse groups, each help line with the field's
    comment, its choices and its default (`values`: the resolved settings to show, else the field defaults)."""
    about = COMMAND_HELP.get(command, "")
    groups = command_groups(command)
    from_ckpt = command in ("eval", "predict")  # the run's settings come from its checkpoint (checkpoint_config)
    if values is not None and "method" in groups.get("method and data", ()) and not from_ckpt:
        shown = " ".join(["--method", str(values.get("method", Config.method)), "--dataset",
                          str(values.get("dataset", Config.dataset))] + (["--demo"] if values.get("demo") else []))
        about += (f"\n\nDefaults shown for {shown}" + (f" (from the flags given: {shlex.join(given_argv)})"
                                                       if given_argv else "")
                  + "; the presets of another --method, --dataset or --demo set others: put them before --help.")
    examples = [ln.strip() for ln in USAGE.splitlines() if re.search(rf"wsss\.py {re.escape(command)}\s", ln)]
    parser = _Parser(prog=f"wsss.py {command}", usage=f"wsss.py {command} [flags]", description=about,
                     epilog="examples:\n  " + "\n  ".join(examples) if examples else None, allow_abbrev=False,
                     argument_default=argparse.SUPPRESS, formatter_class=_HelpFormatter)
    types = {f.name: f.type for f in fields(Config)}
    for title, names in groups.items():
        group = parser.add_argument_group(title)
        for name in names:
            kind = types[name]
            default = (values or {}).get(name, getattr(Config, name))
            taken = from_ckpt and name not in INVOCATION_FIELDS and name != "ckpt"
            help_ = _help_text(name, default, values or {}, "the checkpoint's" if taken else None)
            if kind in ("bool", bool):
                group.add_argument(_flag(name), action=argparse.BooleanOptionalAction, help=help_)
            elif kind in ("tuple", tuple):
                group.add_argument(_flag(name), type=_number_list, metavar="A,B,..", help=help_)
            else:
                metavar = "PATH" if name in _PATH_FIELDS else {"int": "N", "float": "X"}.get(kind, "TEXT")
                group.add_argument(_flag(name), type={"int": int, "float": float, "str": str}[kind], metavar=metavar,
                                   help=help_)
    return parser


def _number_list(text: str) -> tuple:
    try:
        return tuple(float(t) if "." in t or "e" in t else int(t) for t in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}")


def _field_help() -> dict:
    """Each field's trailing comment becomes its --help text (one source of truth: the dataclasses MethodConfig
    and Config)."""
    helps = {}
    for cls in (MethodConfig, Config):
        try:
            body = inspect.getsource(cls)
        except (OSError, TypeError):  # no source (a frozen app): flags without help
            continue
        helps.update((m.group(1), m.group(2).strip())
                     for m in re.finditer(r"^    (\w+): \w+ = .*?  # (.*)$", body, re.M))
    return helps


_FIELD_HELP = _field_help()


def _help_text(name: str, default, values: dict, shown: str = None) -> str:
    """A flag's help line: its comment (a few rewritten where the comment names a table instead of its contents),
    without a "`command`:" prefix (each command has its own help), then the choices the comment does not list,
    then the default (`shown` if given, else `default` as typed on the command line)."""
    method = values.get("method", Config.method)
    text = {
        "method": "the method (its preset sets the defaults of many flags)",
        "demo": "the demo: the synthetic world, a demo CLIP (--demo-model planted: hand-set, the default; toy: "
                "pre-trained on first use), a short schedule; sets "
                + " ".join(_flag(k) + ("" if v is True else f" {v}") for k, v in DEMO.items())
                + "".join(f"; with the {route} CLIP also " + " ".join(_flag(k) + f" {v}" for k, v in d.items())
                          for route, d in DEMO_ROUTES.items()),
        "upstream": "restore the official code's numerics where this file fixed a bug ([upstream bug fixed]); for "
                    f"{method}: " + (", ".join(_flag(k) + ("" if v is True else f" {v}") for k, v in
                                              _upstream_settings(method, values).items()) or "nothing"),
        "ckpt": "checkpoint: train writes it, eval and predict read it, cams uses the trained model only when given "
                "(derived: <out-dir>/ckpt.pt)",
        "save_vis": "folder for PNG overlays (image, CAM, pseudo-label, prediction, truth)",
    }.get(name, _FIELD_HELP.get(name, ""))
    text = re.sub(r"^`[\w-]+`: ", "", text)
    choices = _choices(name)
    if choices and not all(re.search(rf"(?<![\w+-]){re.escape(c)}(?![\w+-])", text) for c in choices):
        text += f" [{' | '.join(choices)}]"
    if shown is None:
        shown = ("on" if default else "off") if isinstance(default, bool) else \
            ",".join(map(str, default)) if isinstance(default, tuple) else "none" if default == "" else \
            shlex.quote(default) if isinstance(default, str) else default
    return f"{text} (default: {shown})".replace("%", "%%")


def _choices(name: str) -> tuple:
    """The allowed values of a field: CHOICES, and the method and dataset tables."""
    return dict(method=tuple(METHODS), dataset=(*DATASETS, "custom")).get(name, CHOICES.get(name, ()))


def _upstream_settings(method: str, values: dict) -> dict:
    """What --upstream sets for `method` on the dataset in `values` (the UPSTREAM table)."""
    table = UPSTREAM.get(method, {})
    out = {k: v for k, v in table.items() if k not in DATASETS}
    out.update(table.get(values.get("dataset", Config.dataset), {}))
    return out


def _help_values(argv, command: str) -> dict:
    """The settings --help shows as defaults: those of the flags given before --help (presets resolved, the
    derived folders filled in), quietly; without a valid configuration, the presets alone, else nothing."""
    given = parse_flags(argv, command)
    import contextlib
    import io
    with contextlib.redirect_stdout(io.StringIO()):  # custom data's notes (SBE/TSE off) are for a run
        try:
            return dataclasses.asdict(make_config(**given))
        except WSSSError:
            try:
                return preset_values(given)
            except WSSSError:
                return dict(given)


def _unknown_argument(extra: list, command: str) -> str:
    """The line for what argparse left over: a flag of another command, a typo (with difflib's closest flag of
    this command, else of any), or a stray word."""
    import difflib
    flags = [a for a in extra if a.startswith("-") and not re.fullmatch(r"-[\d.]+", a)]
    if not flags:
        word = extra[0]
        hint = f" (did you mean --method {word}?)" if word in METHODS else \
            f" (did you mean --dataset {word}?)" if word in DATASETS else ""
        return f"unexpected argument {word!r}: flags take the form --name VALUE{hint}; see wsss.py {command} --help"
    name = flags[0].split("=", 1)[0]
    readers, own = flag_readers(), set(build_parser(command)._option_string_actions)
    if name in readers:
        return f"{command} does not take {name} (a flag of {', '.join(readers[name])}); see wsss.py {command} --help"
    typed = "--" + name.lstrip("-").replace("_", "-").lower()
    score = {flag: difflib.SequenceMatcher(None, typed, flag).ratio() for flag in sorted(own | set(readers))}
    # the closest flag of this command, or a closer one of another command (a stricter bar: a guess across commands)
    mine = difflib.get_close_matches(typed, sorted(own), n=1, cutoff=0.6)
    other = difflib.get_close_matches(typed, sorted(set(readers) - own), n=1, cutoff=0.75)
    guess = sorted(mine + other, key=lambda flag: -score[flag])[:1]
    if not guess:
        return f"unknown flag {name}; see wsss.py {command} --help"
    where = "" if guess[0] in own else f" (a flag of {', '.join(readers[guess[0]])})"
    return f"unknown flag {name}; did you mean {guess[0]}{where}?"


def preset_values(given: dict) -> dict:
    """Every setting before validation: the presets (dataset, method, --demo, --upstream, custom data) under the
    explicit values `given`."""
    method, dataset = given.get("method", Config.method), given.get("dataset", Config.dataset)
    if given.get("demo"):
        dataset = given.get("dataset", DEMO["dataset"])
    if method not in METHODS:
        raise WSSSError(f"unknown --method {method!r}; choose one of {', '.join(METHODS)}")
    if dataset not in DATASETS and dataset != "custom":
        raise WSSSError(f"unknown --dataset {dataset!r}; choose one of {', '.join(DATASETS)}, custom")
    info = custom_dataset_info(given.get("data_root") or os.environ.get("WSSS_DATA_ROOT", "")) \
        if dataset == "custom" else DATASETS[dataset]
    values = dict(info["defaults"])
    values.update({k: v for k, v in METHODS[method].items() if k not in DATASETS})
    values.update(METHODS[method].get(dataset, {}))  # a method's per-dataset values (e.g. ExCEL on COCO)
    if given.get("demo"):
        values.update(DEMO)
        values.update(DEMO_ROUTES.get(given.get("demo_model", DEMO["demo_model"]), {}))
    if given.get("upstream"):  # the official code's numerics (UPSTREAM), under the explicit flags
        values.update({k: v for k, v in UPSTREAM[method].items() if k not in DATASETS})
        values.update(UPSTREAM[method].get(dataset, {}))
    if dataset == "custom":
        values.update(custom_method_defaults(method, info, given))
    values.update(given)
    values.update(method=method, dataset=dataset)
    return values


def make_config(**given) -> Config:
    """Resolve presets under explicit values, validate, and fill the derived fields."""
    cfg = derive_fields(Config(**preset_values(given)))
    validate_config(cfg)
    return cfg


def derive_fields(cfg: Config) -> Config:
    """Fill the settings left empty that follow from others: data and cache folders (environment, --demo), the run
    folder and its checkpoint, the demo's toy CLIP."""
    if not cfg.data_root:
        cfg.data_root = os.environ.get("WSSS_DATA_ROOT", "")
    if not cfg.cache_dir:
        cfg.cache_dir = os.environ.get("WSSS_CACHE", str(Path.home() / ".cache" / "wsss"))
    if cfg.demo and not cfg.data_root:
        cfg.data_root = str(Path(cfg.cache_dir) / f"synthetic-{SYNTH_WORLD}-{cfg.demo_images}")
    if not cfg.out_dir:
        cfg.out_dir = str(Path("runs") / f"{cfg.method}-{cfg.dataset}{'-demo' if cfg.demo else ''}")
    if not cfg.ckpt:
        cfg.ckpt = str(Path(cfg.out_dir) / "ckpt.pt")
    if cfg.demo and cfg.clip_pretrained == Config.clip_pretrained:
        cfg.clip_pretrained = str(toy_clip_path(cfg))
    return cfg


def custom_method_defaults(method: str, info: dict, given: dict) -> dict:
    """Each method on your own classes (--dataset custom): CD-CLIP's SBE needs superclasses.txt, else L_b is off;
    ExCEL's TSE reads descriptions.json (or --descriptions), else template-only texts; each choice is one line.
    DiCLIP's cache prompt takes the class names as they are; WeCLIP needs only the names."""
    values = {}
    if method == "cdclip" and not info["superclasses"].get(info["defaults"]["superclasses"]) \
            and "lambda_b" not in given:
        values["lambda_b"] = 0.0
        print0("custom data: no superclasses.txt, so CD-CLIP's super-class boundary loss (SBE, L_b) is off; add one "
               "(\"super-class: class, class\" per line, see data.md) to use it")
    if method == "excel" and "tse" not in given and not given.get("descriptions") and not given.get("attr_bank"):
        if info["descriptions"]:
            values["descriptions"] = info["descriptions"]
        else:
            values["tse"] = "off"
            print0("custom data: no descriptions.json, so ExCEL's TSE is off (template-only class texts); add one "
                   "({class: [sentences]}, see data.md) or pass --descriptions FILE to use it")
    return values


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


# The allowed values of the fields with choices, and the range rules of the numeric fields: (field, test, what
# the test asks); a tuple field passes if every element does. validate_config applies both tables; a new field adds
# one line to one of them.
CHOICES = dict(refine=REFINE_MODES, sbe_gate=("ge2", "eq1", "all", "off"), norm=("imagenet", "clip"),
               amp=("auto", "bf16", "fp16", "off"), cda_minmax=("patch", "text"), cam=("gradcam", "text"),
               cam_sim=("surgery", "cosine"), svc_attn=("intra", "qk"), svc_heads=("sum", "mean"),
               svc_norm=("tokens", "channels"), caa_attn_mix=("upstream", "mean"), tse=("on", "builtin", "off"),
               relation=("dot", "cos"), lvc_mean=("batch", "image"), eval_resize=("long", "square"),
               tsa=("off", "static", "dynamic"), demo_model=("toy", "planted"), acr_variant=ACR_VARIANTS,
               vce_fusion=VCE_FUSIONS, cache_source=("sd", "synthetic"), tse_drop=("exact", "upstream"),
               adapter_feats=("clean", "upstream"), layout=("voc", "custom"), seg_one_kind=("mean", "half"),
               cache_scheduler=("model", "ddim"))
_RULES = [(name, lambda v, lo=lo: v >= lo, f">= {lo}") for name, lo in (
    ("batch_size", 1), ("crop_size", 1), ("max_steps", 1), ("attn_layers", 1), ("rfm_dynamic_layers", 1),
    ("rfm_dynamic_after", 0), ("par_iters", 0), ("power", 0), ("aff_radius", 0), ("dec_dim", 1),
    ("dec_layers", 0), ("dec_heads", 1), ("dec_mlp", 1), ("warmup_steps", 0), ("eval_long_side", 1),
    ("eval_every", 0), ("log_every", 1), ("save_every", 1), ("crf_iters", 1), ("num_workers", 0),
    ("bench_repeats", 1), ("max_images", 0), ("num_vis", 0), ("demo_images", 1), ("num_images", 1),
    ("image_size", 16), ("toy_steps", 1), ("toy_batch", 2), ("seed", 0), ("par_dilations", 1),
    ("weight_decay", 0), ("toy_weight_decay", 0), ("poly_power", 0), ("lambda_aff", 0), ("lambda_b", 0),
    ("cam_logit_scale", 0), ("par_w2", 0), ("tse_clusters", 0), ("svc_layers", 1), ("adapter_lr", 0),
    ("sd_size", 8), ("sd_timestep", 0), ("acr_k", 1), ("acr_rounds", 0), ("acr_iters", 0), ("vce_layers", 1),
    ("cache_per_class", 1), ("cache_bg", 1), ("cache_prompts", 0), ("cache_images_per_class", 1),
    ("cache_steps", 1), ("cache_image_size", 8), ("acr_delta", 0), ("vce_weight", 0), ("cache_alpha", 0),
    ("lambda_dyn", 0), ("cache_guidance", 0))] + [
    ("sd_timestep", lambda v: v < 1000, "< 1000 (the scheduler's training steps)"),
    ("cache_beta", lambda v: v > 0, "> 0"),
    ("seed", lambda v: v < 2**32, "< 2**32"),
    ("lr", lambda v: v > 0, "> 0 (0 would train nothing)"),
    ("toy_lr", lambda v: v > 0, "> 0"),
    ("eval_scales", lambda v: v > 0, "> 0 (each scale)"),
    ("cda_tau", lambda v: v > 0, "> 0"),
    ("bg_pow", lambda v: v > 0, "> 0"),
    ("par_w1", lambda v: v > 0, "> 0"),
    ("beta1", lambda v: 0 <= v < 1, "in [0, 1)"),
    ("beta2", lambda v: 0 <= v < 1, "in [0, 1)"),
    ("dec_dropout", lambda v: 0 <= v < 1, "in [0, 1)"),
] + [(name, lambda v: 0 <= v <= 1, "in [0, 1]") for name in (
    "warmup_ratio", "toy_warmup", "box_threshold", "cap_threshold", "cp_area_floor", "cam_contrast_floor")] + [
    (name, lambda v: v > 0, "> 0") for name in ("crf_pos_xy", "crf_pos_w", "crf_bi_xy", "crf_bi_rgb", "crf_bi_w")]


def clip_patch_size(cfg: Config):
    """CLIP's patch side, known from the flags alone where possible (--tiny: the toy CLIP's 8; open_clip ViT names
    such as ViT-B-16, ViT-L-14-336: the number after the size); None otherwise (Frozen checks after building)."""
    if cfg.tiny:
        return TOY_CLIP["vision_cfg"]["patch_size"]
    m = re.match(r"ViT-[^-]+-(\d+)(?:-|$)", cfg.clip_model)
    return int(m.group(1)) if m else None


def validate_config(cfg: Config):
    """Every flag is checked here, once, before any work: names and choices, numeric ranges (_RULES; NaN and inf
    never pass), cross-field constraints, the device string, --crf's package, and that no folder the run writes
    sits under a regular file. A failure is one WSSSError line (main: exit status 2)."""
    for name, allowed in CHOICES.items():
        if getattr(cfg, name) not in allowed:
            raise WSSSError(f"{_flag(name)} {getattr(cfg, name)!r} is not one of {', '.join(allowed)}")
    if cfg.demo_model == "planted" and cfg.dataset != "synthetic":
        raise WSSSError("--demo-model planted is hand-set for the synthetic world: it needs --dataset synthetic "
                        "(or --demo)")
    supers = dataset_info(cfg)["superclasses"]
    if cfg.superclasses not in supers:
        raise WSSSError(f"--superclasses {cfg.superclasses} has no table for {cfg.dataset}; "
                        f"choose {'|'.join(map(str, supers))}")
    for f in fields(cfg):  # types (make_config can be called with anything) and finiteness
        v = getattr(cfg, f.name)
        items = v if isinstance(v, tuple) else (v,)
        if f.type in ("tuple", tuple) and (not isinstance(v, tuple) or not v):
            raise WSSSError(f"{_flag(f.name)} needs at least one number, got {v!r}")
        if f.type in ("int", "tuple", int, tuple) and f.name != "eval_scales" and not all(map(_is_int, items)):
            raise WSSSError(f"{_flag(f.name)} must be {'integers' if isinstance(v, tuple) else 'an integer'}, "
                            f"got {v!r}")
        if any(not _is_int(x) and isinstance(x, (int, float)) and not math.isfinite(x) for x in items):
            raise WSSSError(f"{_flag(f.name)} must be a finite number, got {v!r}")
    for name, ok, what in _RULES:
        v = getattr(cfg, name)
        if not all(ok(x) for x in (v if isinstance(v, tuple) else (v,))):
            raise WSSSError(f"{_flag(name)} must be {what}, got {','.join(map(str, v)) if isinstance(v, tuple) else v}")
    if not (0 < cfg.scale_min <= cfg.scale_max):
        raise WSSSError(f"need 0 < --scale-min <= --scale-max, got {cfg.scale_min}, {cfg.scale_max}")
    if not (0 < cfg.tse_keep <= 1):  # K_r = 0 would keep nothing; upstream's K_r = 1 gave NaN (fixed below)
        raise WSSSError(f"--tse-keep (K_r) must be in (0, 1], got {cfg.tse_keep}")
    if cfg.cam == "text" and cfg.tse != "off":  # ExCEL's TSE inputs, checked before any work
        for name in ("attr_bank", "descriptions"):
            if getattr(cfg, name) and not Path(getattr(cfg, name)).is_file():
                raise WSSSError(f"{_flag(name)} file not found: {getattr(cfg, name)}")
        given = cfg.attr_bank or cfg.descriptions
        if cfg.tse == "builtin" and given:
            raise WSSSError("--tse builtin uses wsss.py's own sentences: drop --attr-bank/--descriptions, or use "
                            "--tse on to use them")
        if cfg.descriptions:  # parsed now (cheap), not after the data scan and the CLIP build
            description_sentences(cfg)
        if cfg.attr_bank:
            read_attr_bank(cfg.attr_bank)
        if cfg.tse == "builtin" and cfg.dataset not in BUILTIN_DESCRIPTIONS:
            raise WSSSError(f"--tse builtin: wsss.py has no sentences for {cfg.dataset}; give ExCEL's --attr-bank "
                            f"FILE or --descriptions FILE (see data.md)")
        if cfg.tse == "on" and not given and cfg.dataset == "custom":
            raise WSSSError("ExCEL's TSE on your own classes needs their descriptions: descriptions.json in "
                            "--data-root or --descriptions FILE ({class: [sentences]}, see data.md), or --tse off")
        if cfg.tse == "on" and not given and cfg.dataset in ("voc", "coco") and not cfg.tiny \
                and cfg.clip_pretrained != "random":
            raise WSSSError(f"ExCEL's TSE on {cfg.dataset} uses ExCEL's GPT-4 attribute bank: pass --attr-bank FILE "
                            f"(its attributes_text/*_embedding_bank.pth) or --descriptions FILE (its JSON); see "
                            f"data.md. --tse builtin uses wsss.py's own sentences instead (not the paper's), "
                            f"--tse off none")
    if cfg.labels_file:
        if cfg.dataset == "custom":
            raise WSSSError("--labels-file is for the VOC layout (WeCLIP's cls_labels_onehot.npy); --dataset custom "
                            "reads its labels from <split>.csv")
        if not Path(cfg.labels_file).is_file():
            raise WSSSError(f"--labels-file file not found: {cfg.labels_file}")
    if cfg.lvc and cfg.relation != "cos":
        raise WSSSError("--lvc needs --relation cos (the bias is softmax of ExCEL's relation R)")
    if cfg.lvc and cfg.cam != "text":
        raise WSSSError("--lvc calibrates the patch-text CAM: it needs --cam text")
    if (cfg.vce or cfg.tsa != "off") and cfg.cam != "text":
        raise WSSSError("--vce and --tsa act on the patch-text CAM: they need --cam text")
    if "{category}" not in cfg.cache_prompt:
        raise WSSSError("--cache-prompt must contain {category} (replaced by each class name)")
    if not cfg.sd_layers.strip():
        raise WSSSError("--sd-layers is empty: use up, or a comma list of UNet attention-layer name prefixes")
    if cfg.dec_dim % cfg.dec_heads:
        raise WSSSError(f"--dec-dim {cfg.dec_dim} must be divisible by --dec-heads {cfg.dec_heads} (attention heads "
                        f"split the width)")
    patch = clip_patch_size(cfg)
    for name in ("crop_size", "eval_long_side"):
        if patch and getattr(cfg, name) < patch:
            raise WSSSError(f"{_flag(name)} {getattr(cfg, name)} is smaller than one CLIP patch "
                            f"({patch} px for {'the toy CLIP' if cfg.tiny else cfg.clip_model}); use >= {patch}")
    if cfg.template.count("{}") != 1:
        raise WSSSError(f"--template {cfg.template!r} must contain {{}} once (where the class name goes)")
    if cfg.device == "mps":
        raise WSSSError("--device mps is not supported (CUDA or CPU only; the label path is untested on Apple GPUs): "
                        "use --device cpu")
    if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", cfg.device):
        raise WSSSError(f"--device {cfg.device!r} is not a device (auto | cpu | cuda | cuda:N)")
    if cfg.crf and importlib.util.find_spec("pydensecrf") is None:
        raise WSSSError(CRF_MISSING)
    for name in ("out_dir", "cache_dir", "save_vis"):
        if getattr(cfg, name):
            check_folder(getattr(cfg, name), _flag(name))
    if cfg.ckpt:
        check_folder(Path(cfg.ckpt).parent, "--ckpt")


# ----------------------------------------------------------------------------------------------------
# II.2 Devices, atomic writes, run folders, locks, Ctrl-C, DDP agreement
# ----------------------------------------------------------------------------------------------------

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


def atomic_save(obj, path):
    """torch.save to a temp file in the same folder, then rename: a crash never leaves a half-written file."""
    _atomic(path, lambda tmp: torch.save(obj, tmp))


def atomic_write_text(text: str, path):
    _atomic(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def save_image(array: np.ndarray, path, mode: str = None, **options):
    """An image file (format from the suffix: PNG, JPEG), written atomically: a full disk or a read-only folder
    is one line and leaves no half-written image."""
    from PIL import Image
    fmt = {".jpg": "JPEG", ".jpeg": "JPEG"}.get(Path(path).suffix.lower(), "PNG")
    _atomic(path, lambda tmp: Image.fromarray(array, mode=mode).save(tmp, format=fmt, **options))


def append_line(line: str, path):
    """One line appended to a log file (metrics.jsonl); a full disk is one line, not a traceback."""
    try:
        with open(path, "a") as f:
            f.write(line + "\n")
    except OSError as e:
        raise WSSSError(f"cannot write {path}: {e.strerror or e}") from e


def _atomic(path, write):
    """write(tmp) to `.NAME.tmpPID` next to `path`, then os.replace. On any failure the temp file is removed
    (kill -9 leaves it behind: clean_stale_temps); a full disk or a read-only folder is one WSSSError line."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write(tmp)
        os.replace(tmp, path)
    except BaseException as e:
        try:
            tmp.unlink(missing_ok=True)
        except OSError:
            pass
        if isinstance(e, (OSError, RuntimeError)):  # torch.save reports a failed write as a RuntimeError
            reason = e.strerror if isinstance(e, OSError) and e.strerror else (str(e).strip().splitlines() or [""])[0]
            raise WSSSError(f"cannot write {path}: {reason}") from e
        raise


_TEMP_NAME = re.compile(r"^\..+\.tmp(\d+)$")  # atomic writes' temp files: .NAME.tmpPID


def pid_alive(pid: int) -> bool:
    """Whether a process with this id runs on this machine (signal 0 probes without sending anything)."""
    try:
        os.kill(pid, 0)
    except PermissionError:  # it exists, as another user's process
        return True
    except (ProcessLookupError, OverflowError, ValueError):
        return False
    return pid > 0


def clean_stale_temps(folder) -> int:
    """Remove the temp files of atomic writes whose writer is gone (kill -9, power loss: up to a checkpoint's
    size each); a live writer's temp file is left alone. Returns how many were removed."""
    folder, removed = Path(folder), 0
    if not folder.is_dir():
        return 0
    for f in folder.iterdir():
        m = _TEMP_NAME.match(f.name)
        if m and int(m.group(1)) != os.getpid() and not pid_alive(int(m.group(1))) and f.is_file():
            try:
                f.unlink()
                removed += 1
            except OSError:
                pass
    if removed:
        print0(f"removed {removed} temp file{'s' * (removed > 1)} of interrupted saves in {folder}")
    return removed


def check_folder(path, flag: str):
    """A folder a run will write (it need not exist yet): if it, or the nearest existing parent, is a regular
    file -> one line now, instead of a traceback when the first write happens. Creates nothing."""
    p = Path(path).expanduser()
    for q in (p, *p.parents):
        if q.exists():
            if not q.is_dir():
                raise WSSSError(f"{flag} {path}: {q} is a file, not a folder")
            return


def make_dir(path, flag: str) -> Path:
    """Create a folder the run writes (check_folder first); a read-only place or a permission error -> one line."""
    check_folder(path, flag)
    try:
        Path(path).mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise WSSSError(f"cannot create the {flag} folder {path}: {e.strerror or e}")
    return Path(path)


def read_text(path, what: str) -> str:
    """A text file a user wrote (split list; class-description files): UTF-8, a leading byte-order mark dropped;
    any other encoding -> one line naming the first bad byte."""
    try:
        data = Path(path).read_bytes()
    except OSError as e:
        raise WSSSError(f"cannot read {what} {path}: {e.strerror or e}")
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise WSSSError(f"{what} {path} is not UTF-8 text (byte 0x{data[e.start]:02x} at offset {e.start}): "
                        f"save it as UTF-8")


def load_cache(path, read):
    """Derived data under --cache-dir (the label scan, the toy CLIP; also the place for attribute banks and
    key-value caches): returns read(path), or None when there is nothing usable so that the caller rebuilds it
    (and writes it with atomic_save / atomic_write_text). A file that exists but that `read` rejects -- it raises
    or returns None: truncated, zero bytes, random bytes, another program's file, an old format -- is reported
    in one line and removed. `read` checks whatever the user of the cache relies on (types, keys, shapes)."""
    path = Path(path)
    if not path.is_file():
        return None
    try:
        value = read(path)
    except Exception:  # any failure to parse: a cache is derived data, rebuilt rather than trusted
        value = None
    if value is None:
        print0(f"cache {path} is corrupt; rebuilding")
        try:
            path.unlink()
        except OSError:
            pass
    return value


class RunLock:
    """<folder>/.lock, created with O_EXCL (atomic), holding "pid host": a second run into the same folder stops
    with one line instead of interleaving its files with the first. The lock of a process that died on this
    host (kill -9) is stale and taken over; one from another host is respected (shared filesystems)."""

    def __init__(self, folder):
        self.path, self.held = Path(folder) / ".lock", False

    def acquire(self) -> "RunLock":
        for _ in range(3):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                try:
                    pid, host = (self.path.read_text().split() + ["", ""])[:2]
                except OSError:
                    continue  # released meanwhile
                if not (pid.isdigit() and host == socket.gethostname() and not pid_alive(int(pid))):
                    raise WSSSError(f"{self.path.parent} is in use by another run (pid {pid or '?'} on "
                                    f"{host or '?'}; lock file {self.path}): wait for it, pick another --out-dir, "
                                    f"or delete the lock file if that run is gone")
                self.path.unlink(missing_ok=True)  # stale: its process is dead
                continue
            with os.fdopen(fd, "w") as f:
                f.write(f"{os.getpid()} {socket.gethostname()}\n")
            self.held = True
            return self
        raise WSSSError(f"could not take the lock {self.path}; is another run starting there?")

    def release(self):
        if self.held:
            self.held = False
            try:
                self.path.unlink()
            except OSError:
                pass


class PeerFailed(WSSSError):
    """Another DDP process failed and reported why: this one exits quietly (status 2)."""


def agree(failure: BaseException = None, stop: bool = False) -> bool:
    """Keeps DDP processes in step when something goes wrong on one of them. Every rank calls it at the same
    point with the exception it caught there (or None) and its stop request (Ctrl-C); one all_reduce(MAX) of
    the two flags tells every rank what happened anywhere. The failing rank re-raises its error (main prints
    it, also on a rank other than 0), the others raise PeerFailed (exit quietly, instead of a gloo/nccl
    "connection closed" traceback). Otherwise returns whether any rank asked to stop. One 2-element
    all_reduce; a single process communicates nothing."""
    failed = failure is not None
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        device = torch.device("cuda", torch.cuda.current_device()) \
            if torch.distributed.get_backend() == "nccl" else torch.device("cpu")
        flags = torch.tensor([failed, stop], dtype=torch.int32, device=device)
        torch.distributed.all_reduce(flags, op=torch.distributed.ReduceOp.MAX)
        failed, stop = (bool(v) for v in flags.tolist())
    if failure is not None:
        failure.rank_local = True
        raise failure
    if failed:
        raise PeerFailed("another process failed (it printed the reason)")
    return stop


def on_rank0(fn, *args):
    """fn(*args) on rank 0 while the other DDP ranks wait (demo assets, the run folder; a cache build): a failure
    there is reported by rank 0 and the others stop quietly (agree) instead of timing out at a barrier.
    Returns fn's result on rank 0, None on the others."""
    result, failure = None, None
    if dist_info()[0] == 0:
        try:
            result = fn(*args)
        except Exception as e:
            failure = e
    agree(failure)
    return result


def shard(n: int):
    rank, world, _ = dist_info()
    return range(rank, n, world)


def all_reduce_sum(t):
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.all_reduce(t)
    return t


class RunInterrupted(Exception):
    """Ctrl-C (or SIGTERM) ended a run: `step` is the step of the checkpoint `ckpt` to continue from (None: nothing
    saved); `finished`: training was complete (the signal came in the last step or the final evaluation). main
    prints one line; exit status 130 (SIGINT) or 143 (SIGTERM), as a shell reports a process killed by either."""

    def __init__(self, step=None, ckpt=None, finished: bool = False, signum: int = signal.SIGINT):
        super().__init__(f"interrupted at step {step}")
        self.step, self.ckpt, self.finished, self.signum = step, ckpt, finished, signum


class Terminated(KeyboardInterrupt):
    """SIGTERM outside the training loop (what a cluster scheduler sends before it kills a preempted job): handled
    as Ctrl-C is there (nothing half-done to save)."""


def _raise_terminated(signum, frame):
    raise Terminated()


class GracefulStop:
    """Ctrl-C (SIGINT) or SIGTERM during the training loop: a flag, read at the start of each step and after the
    last one. The step in progress
    (and a validation in progress) finishes, every DDP rank stops before the same step (the flag travels with
    agree's all_reduce; torchrun forwards Ctrl-C to every process), rank 0 saves a checkpoint, and the run
    raises RunInterrupted. Outside the loop Ctrl-C raises KeyboardInterrupt as usual. `saved` is the
    (step, path) of the latest checkpoint this run can be continued from."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self):
        self.requested, self.saved, self.signum, self._previous = False, None, signal.SIGINT, {}

    def install(self):
        if not self._previous and threading.current_thread() is threading.main_thread():
            self._previous = {s: signal.signal(s, self._handler) for s in self.SIGNALS}
        return self

    def _handler(self, signum, frame):
        self.requested, self.signum = True, signum

    def restore(self):
        for s, previous in self._previous.items():
            signal.signal(s, previous if previous is not None else signal.SIG_DFL)
        self._previous = {}


def _ignore_sigint(_worker_id):
    """DataLoader workers: Ctrl-C reaches the whole process group; the main process alone decides (GracefulStop).
    SIGTERM keeps its default (PyTorch ends its workers with it): a scheduler's SIGTERM to the group ends them, and
    the main process, which got it too, stops as for Ctrl-C (batches() reads the dead loader as the stop)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def _progress(it, disable=False, what: str = None):
    """tqdm when available and on a terminal; off a terminal (a log file, a scheduler) and given `what`, a line
    on stdout at each quarter with the elapsed time; else a silent iterator with the same interface."""
    tty = sys.stderr.isatty()
    try:
        from tqdm import tqdm
        if tty or disable:
            return tqdm(it, disable=disable or not tty, dynamic_ncols=True, desc=what)
    except ImportError:
        pass

    class Plain:
        def __init__(self, it):
            self.it = it

        def __iter__(self):
            n, t0 = (len(self.it) if hasattr(self.it, "__len__") else 0), time.time()
            marks = {max(1, round(n * q / 4)) for q in (1, 2, 3, 4)} if what and n and not disable else set()
            for i, x in enumerate(self.it, 1):
                yield x
                if i in marks:
                    print(f"{what}: {i}/{n} ({time.time() - t0:.0f} s)", flush=True)

        def set_postfix(self, **kw):
            pass

        def update(self, n=1):
            pass

        def close(self):
            pass
    return Plain(it)


# ----------------------------------------------------------------------------------------------------
# II.3 Image files and the label scan
# ----------------------------------------------------------------------------------------------------

def open_image(path, what: str = "image"):
    """PIL.Image.open (lazy: reads the header only) with PIL's decompression-bomb guard as one line: above
    Image.MAX_IMAGE_PIXELS (89 M) PIL only warns and above twice that it raises; both are an error here (such a
    file costs GBs to decode, also inside DataLoader workers)."""
    from PIL import Image
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            return Image.open(path)
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
            raise WSSSError(f"{what} {path} is too large to decode safely ({e}); downscale it, or raise "
                            f"PIL.Image.MAX_IMAGE_PIXELS if you trust the file")


def load_rgb(path) -> np.ndarray:
    """Any image file -> uint8 (H, W, 3). Grayscale is replicated, RGBA drops alpha, CMYK/YCbCr/palette are
    converted by PIL, 16-bit images are scaled to 8 bits. Unreadable or truncated files -> WSSSError."""
    try:
        with open_image(path) as im:
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
    try:
        with open_image(path, "mask") as im:
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


def read_split(cfg: Config, split: str) -> list:
    """The VOC folder layout: <root>/JPEGImages/<name>.jpg, <root>/SegmentationClassAug/<name>.png (or
    SegmentationClass/), split lists <root>/ImageSets/Segmentation/<split>.txt (or <root>/<split>.txt): one name
    per line (names may contain spaces; surrounding whitespace and blank lines are ignored; a name listed twice is
    used once). -> [(name, image path, mask path or None)]; every missing piece is one line. With --labels-file
    (image-level labels from a file) the masks are optional: a split without them is not scored. --dataset
    custom: read_custom_split."""
    root = Path(cfg.data_root)
    if cfg.dataset == "custom":
        custom_dataset_info(cfg.data_root)  # the class file first: its errors name the folder
        return read_custom_split(cfg, split)[0]
    if not cfg.data_root:
        raise WSSSError(f"no --data-root given for {cfg.dataset}: pass --data-root DIR (e.g. "
                        f"VOCdevkit/VOC2012; layout in data.md) or set WSSS_DATA_ROOT, or try --demo")
    if not root.is_dir():
        raise WSSSError(f"data root {str(root)!r} not found: pass --data-root DIR (layout in data.md) or try --demo")
    lists = [root / "ImageSets" / "Segmentation" / f"{split}.txt", root / f"{split}.txt"]
    list_path = next((p for p in lists if p.is_file()), None)
    if list_path is None:
        raise WSSSError(f"split list for {split!r} not found; expected {lists[0]} (see data.md)")
    names = [n.strip() for n in read_text(list_path, "split list").splitlines() if n.strip()]
    unique = list(dict.fromkeys(names))
    if len(unique) < len(names):  # duplicates would be trained on twice and counted twice in the mIoU
        print0(f"data: {list_path.name} lists {len(names) - len(unique)} name(s) more than once; each image is "
               f"used once")
        names = unique
    mask_dir = next((d for d in ("SegmentationClassAug", "SegmentationClass") if (root / d).is_dir()), None)
    if mask_dir is None and not cfg.labels_file:
        raise WSSSError(f"no SegmentationClassAug/ or SegmentationClass/ folder in {root}: the image-level labels "
                        f"come from the masks unless --labels-file gives them (see data.md)")
    strip = dataset_info(cfg)["mask_strip"]
    items = []
    for n in names:
        image = root / "JPEGImages" / f"{n}.jpg"
        mask = root / (mask_dir or "SegmentationClassAug") / f"{re.sub(strip, '', n) if strip else n}.png"
        if not image.is_file():
            raise WSSSError(f"image listed in {list_path.name} but missing: {image}")
        items.append((n, image, mask if mask.is_file() or not cfg.labels_file else None))
    return items


def scan_labels(cfg: Config, split: str, items: list) -> list:
    """Image-level labels [sorted foreground class ids] of `items`: from the labels file where there is one
    (--dataset custom: <split>.csv; VOC/COCO: --labels-file, WeCLIP's cls_labels_onehot.npy), else derived from the
    masks (classes present minus background and 255). Cached under cache_dir; the cache key covers the root
    and, for every listed image and mask, its name, size and mtime (one stat each), so an edited dataset is
    re-scanned; a corrupt cache file is rebuilt (load_cache). The scan also reads each image's header (readable,
    not a decompression bomb, the size of its mask): a bad image of any split is reported before training starts
    rather than in a worker or at the final evaluation."""
    root, K = Path(cfg.data_root), len(dataset_info(cfg)["classes"])
    lists = [root / "ImageSets" / "Segmentation" / f"{split}.txt", root / f"{split}.txt"]
    list_name = next((p.name for p in lists if p.is_file()), f"{split}.txt")
    given = read_custom_split(cfg, split)[1] if cfg.dataset == "custom" else \
        onehot_labels(cfg.labels_file, [n for n, _, _ in items], K) if cfg.labels_file else None
    source = root / f"{split}.csv" if cfg.dataset == "custom" else cfg.labels_file
    sig = hashlib.sha1(f"{root.resolve()}|{list_name}|{source}|{_stat_key(source) if source else ''}|".encode())
    for n, image, mask in items:
        sig.update(f"{n}|{_stat_key(image)}|{_stat_key(mask)}\n".encode())
    path = Path(cfg.cache_dir) / "labels" / f"{cfg.dataset}-{split}-{sig.hexdigest()[:12]}.json"
    names = [n for n, _, _ in items]

    def read(p):
        labels = json.loads(p.read_text(encoding="utf-8"))
        ok = isinstance(labels, dict) and all(
            isinstance(labels.get(n), list) and all(_is_int(c) and 0 < c < K for c in labels[n]) for n in names)
        return labels if ok else None

    labels = load_cache(path, read)
    if labels is None:
        labels = {}
        for n, image, m in items:
            mask = load_mask(m, K) if m is not None else None
            try:
                with open_image(image) as im:
                    size = im.size
            except (OSError, SyntaxError, ValueError) as e:
                raise WSSSError(f"cannot read image {image}: {e} (corrupt or truncated file?)")
            if mask is not None and size != mask.shape[::-1]:
                raise WSSSError(f"image {image} is {size[0]}x{size[1]} but its mask is {mask.shape[1]}x{mask.shape[0]}")
            labels[n] = given[n] if given is not None else [int(c) for c in np.unique(mask) if 0 < c < K]
        try:
            clean_stale_temps(path.parent)
            atomic_write_text(json.dumps(labels), path)
        except WSSSError:
            pass  # a read-only cache only costs a re-scan next time
    return [labels[n] for n in names]


# ---- your own data: --dataset custom (the format is in data.md) ----
# <root>/classes.txt          one class per line, "name" or "name: prompt words" (WeCLIP-style prompt synonyms);
#                             background is class 0, implicit; '#' starts a comment
# <root>/background.txt       optional background words, one per line (default: WeCLIP's VOC words)
# <root>/superclasses.txt     optional, CD-CLIP's SBE: "super-class: class, class, ..." covering every class once
# <root>/descriptions.json    optional, ExCEL's TSE: {class: [sentences]} (or --descriptions FILE)
# <root>/images/              the images; <root>/<split>.csv: "image,classA;classB" per line (header optional)
# <root>/masks/<stem>.png     optional masks (ids in classes.txt order, 0 background, 255 ignore): scored, never trained
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm")
_CUSTOM_INFO = {}  # resolved root -> (files' stamp, info); a checkpoint's info is registered with stamp None


def _text_lines(path, what: str) -> list:
    """The non-blank lines of a user's text file (BOM, CRLF and '#' comments dropped), with their line numbers."""
    lines = [(i, ln.split("#", 1)[0].strip()) for i, ln in enumerate(read_text(path, what).splitlines(), 1)]
    return [(i, ln) for i, ln in lines if ln]


def custom_dataset_info(root) -> dict:
    """The class table of a custom dataset, in DATASETS' form, from the files in `root` (see above); cached until
    one of them changes. Every bad file is one line: a class listed twice or named background, a super-class
    member that is no class, a class in no super-class."""
    if not root:
        raise WSSSError("--dataset custom needs --data-root DIR: a folder with classes.txt, images/ and a labels "
                        "file per split (train.csv, val.csv); see data.md, or `wsss.py synth --layout custom "
                        "--data-root DIR`")
    root = Path(root).expanduser()
    key = str(root.resolve())
    files = [root / n for n in ("classes.txt", "background.txt", "superclasses.txt", "descriptions.json")]
    stamp = tuple(_stat_key(p) for p in files)
    cached = _CUSTOM_INFO.get(key)
    if cached is not None and cached[0] in (None, stamp):
        return cached[1]
    if not root.is_dir():
        raise WSSSError(f"data root {str(root)!r} not found: pass --data-root DIR (the custom layout is in data.md)")
    if not files[0].is_file():
        raise WSSSError(f"no classes.txt in {root}: --dataset custom needs one class name per line (see data.md)")
    names, prompts = [], []
    for i, line in _text_lines(files[0], "class file"):
        name, _, words = line.partition(":")
        name, words = name.strip(), words.strip()
        where = f"{files[0]} line {i}"
        if name.lower() == "background":
            raise WSSSError(f"{where}: 'background' is class 0, implicit: do not list it")
        if name in names:
            raise WSSSError(f"{where}: class {name!r} is listed twice")
        if any(ch in name for ch in ",;"):
            raise WSSSError(f"{where}: class {name!r} contains ',' or ';' (the labels file separates with them)")
        names.append(name)
        prompts.append(words or name)
    if not names:
        raise WSSSError(f"{files[0]} lists no class")
    bg = [ln for _, ln in _text_lines(files[1], "background file")] if files[1].is_file() else list(VOC_BG)
    table = {}
    if files[2].is_file():
        owner = {}
        for i, line in _text_lines(files[2], "super-class file"):
            sup, _, members = line.partition(":")
            members = [m.strip() for m in members.split(",") if m.strip()]
            for m in members:
                if m not in names:
                    raise WSSSError(f"{files[2]} line {i}: {m!r} is not a class of classes.txt")
                if m in owner:
                    raise WSSSError(f"{files[2]} line {i}: class {m!r} is already in super-class {owner[m]!r}")
                owner[m] = sup.strip()
            table[sup.strip()] = members
        missing = [n for n in names if n not in owner]
        if missing:
            raise WSSSError(f"{files[2]}: every class needs a super-class; missing {missing[:5]}")
    info = dict(classes=["background"] + names, prompts=prompts, bg_prompts=bg, mask_strip="",
                superclasses={len(table): table}, attr_ratio=112 / 400,
                descriptions=str(files[3]) if files[3].is_file() else "",
                defaults=dict(train_split="train", val_split="val", superclasses=len(table)))
    _CUSTOM_INFO[key] = (stamp, info)
    return info


def register_dataset_info(root, info: dict):
    """Use a checkpoint's class table for a custom dataset (predict needs no data folder)."""
    _CUSTOM_INFO[str(Path(root or ".").expanduser().resolve())] = (None, info)


def read_custom_split(cfg: Config, split: str):
    """A custom split: <root>/<split>.csv, one "image,classA;classB" row per image (image relative to images/; a
    header row "image,..." and blank lines skipped; an image listed twice used once). -> items [(name, image path,
    mask path or None)], labels {name: [class ids]}; an unknown class or a missing image is one line."""
    import csv
    root = Path(cfg.data_root)
    path = root / f"{split}.csv"
    if not path.is_file():
        raise WSSSError(f"labels file for split {split!r} not found: {path} (rows \"image,classA;classB\"; see data.md)")
    ids = {n: k for k, n in enumerate(dataset_info(cfg)["classes"]) if k}
    items, labels, dup = [], {}, 0
    for i, row in enumerate(csv.reader(read_text(path, "labels file").splitlines()), 1):
        if not row or not "".join(row).strip():
            continue
        image = row[0].strip()
        if i == 1 and image.lower() in ("image", "file", "filename", "name"):
            continue  # a header
        if len(row) > 2:
            raise WSSSError(f"{path} line {i}: expected 2 columns (image,classA;classB), got {len(row)}: separate "
                            f"classes with ';'")
        tags = [t.strip() for t in (row[1] if len(row) > 1 else "").split(";") if t.strip()]
        unknown = [t for t in tags if t not in ids]
        if unknown:
            raise WSSSError(f"{path} line {i}: unknown class {unknown[0]!r} (classes.txt has {len(ids)}: "
                            f"{', '.join(list(ids)[:6])}{', ...' if len(ids) > 6 else ''})")
        name = str(Path(image).with_suffix(""))
        if name in labels:
            dup += 1
            continue
        file = root / "images" / image
        if not file.is_file():
            raise WSSSError(f"{path} line {i}: image not found: {file}")
        mask = root / "masks" / f"{name}.png"
        items.append((name, file, mask if mask.is_file() else None))
        labels[name] = sorted({ids[t] for t in tags})
    if dup:
        print0(f"data: {path.name} lists {dup} image(s) more than once; each image is used once")
    return items, labels


def onehot_labels(path, names: list, num_classes: int) -> dict:
    """VOC/COCO image-level labels from WeCLIP/ExCEL's cls_labels_onehot.npy: a pickled dict {name: multi-hot over
    the C foreground classes}, so a VOC run needs no training masks. -> {name: [class ids]}; a name missing from
    the file or a vector of another length is one line. (np.load unpickles: only load a file you trust.)"""
    try:
        data = np.load(path, allow_pickle=True)
        data = data.item() if data.dtype == object and data.shape == () else None
    except (OSError, ValueError, EOFError) as e:
        raise WSSSError(f"--labels-file {path}: cannot read ({type(e).__name__}: {e})")
    if not isinstance(data, dict):
        raise WSSSError(f"--labels-file {path}: expected a saved dict {{image name: multi-hot vector}} "
                        f"(WeCLIP's cls_labels_onehot.npy)")
    out = {}
    for n in names:
        v = data.get(n, data.get(re.sub(r"^.*/", "", n)))  # COCO lists "train/<name>"; the file uses <name>
        if v is None:
            raise WSSSError(f"--labels-file {path} has no labels for image {n!r}")
        v = np.asarray(v).reshape(-1)
        if v.size != num_classes - 1 or not np.isin(v, (0, 1)).all():
            raise WSSSError(f"--labels-file {path}: labels of {n!r} are not a 0/1 vector of {num_classes - 1} classes")
        out[n] = [int(c) + 1 for c in np.flatnonzero(v)]
    return out


def _stat_key(path) -> str:
    """size and mtime (ns) of a file, "-" if absent: what a label-cache key needs to notice an edit."""
    if path is None or path == "":
        return "-"
    try:
        st = os.stat(path)
    except OSError:
        return "-"
    return f"{st.st_size},{st.st_mtime_ns}"


# ----------------------------------------------------------------------------------------------------
# II.4 Model loading: CLIP (open_clip), DINOv2 (transformers), Stable Diffusion (diffusers); tiny configs
# ----------------------------------------------------------------------------------------------------

# The toy CLIP (the architecture of --tiny, and of the model `pretrain-toy` trains for --demo): the same
# open_clip.CLIP class as ViT-B-16, just small.
# Its image embedding is the mean of the projected patch tokens (pool_type="avg"), which is exactly the embedding
# WeCLIP's GradCAM explains, so contrastive pre-training aligns the patch tokens themselves with the texts.
TOY_CLIP = dict(embed_dim=64, text_cfg=dict(context_length=24, vocab_size=49408, width=64, heads=2, layers=2),
                vision_cfg=dict(image_size=64, layers=3, width=96, head_width=32, patch_size=8, pool_type="avg"))
TOY_DINO = dict(hidden_size=48, num_hidden_layers=2, num_attention_heads=2, mlp_ratio=2, patch_size=8, image_size=64)


def toy_clip_path(cfg: Config) -> Path:
    key = hashlib.sha1(json.dumps([SYNTH_WORLD, TOY_CLIP, cfg.toy_steps, cfg.toy_batch, cfg.toy_lr,
                                   cfg.toy_weight_decay, cfg.toy_warmup, cfg.toy_seed]).encode())
    return Path(cfg.cache_dir) / f"toy-clip-{key.hexdigest()[:10]}.pt"


def read_toy_clip(path):
    """load_cache reader of a pre-trained toy CLIP: the toy architecture's keys and shapes, finite weights."""
    import open_clip
    state = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(state, dict) or state.get("toy_clip") != TOY_CLIP or not isinstance(state.get("model"), dict):
        return None
    with torch.device("meta"):  # shapes only: no memory, no random numbers drawn
        ref = open_clip.CLIP(**TOY_CLIP).state_dict()
    model = state["model"]
    ok = model.keys() == ref.keys() and all(torch.is_tensor(model[k]) and model[k].shape == v.shape and
                                            bool(torch.isfinite(model[k]).all()) for k, v in ref.items())
    return state if ok else None


def clip_description(cfg: Config) -> str:
    """Which CLIP a run uses, for its log line: the planted demo model, the toy one, or the named checkpoint."""
    if cfg.demo_model == "planted":
        return "planted (hand-set weights)"
    weights = cfg.clip_pretrained if not cfg.tiny or _is_path(cfg.clip_pretrained) else "random"
    return f"{cfg.clip_model if not cfg.tiny else 'toy'} ({weights})"


def _is_path(s: str) -> bool:
    return "/" in s or s.endswith((".pt", ".pth", ".bin", ".safetensors")) or Path(s).exists()


_HUB = {}


def hub_offline_unless_reachable(host: str = "huggingface.co", timeout: float = 3.0) -> bool:
    """Before a model-hub load: if the hub cannot be reached within `timeout` seconds, switch the hub libraries
    to offline mode for this process (HF_HUB_OFFLINE), so a model missing from the local cache fails at once with
    our one line instead of ~50 s of retries and their warnings; a cached model still loads. -> reachable."""
    import socket
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False"):
        return False
    if host not in _HUB:
        try:
            socket.create_connection((host, 443), timeout=timeout).close()
            _HUB[host] = True
        except OSError:
            _HUB[host] = False
    if not _HUB[host]:
        os.environ["HF_HUB_OFFLINE"] = "1"
        try:  # the flag is read when huggingface_hub is imported: set the imported copy too
            import huggingface_hub.constants as hub_constants
            hub_constants.HF_HUB_OFFLINE = True
        except (ImportError, AttributeError):
            pass
    return _HUB[host]


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
                try:
                    state = torch.load(cfg.clip_pretrained, map_location="cpu", weights_only=True)
                    model.load_state_dict(state.get("model", state))
                except Exception as e:
                    raise WSSSError(f"cannot load the toy CLIP checkpoint {cfg.clip_pretrained} "
                                    f"({type(e).__name__}): not a state dict of the toy architecture")
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
            if pretrained and not _is_path(pretrained):
                hub_offline_unless_reachable()
            try:
                import logging
                level = logging.getLogger().level  # open_clip logs its download failure at ERROR: our line says it
                logging.getLogger().setLevel(logging.CRITICAL)
                try:
                    model = open_clip.create_model(cfg.clip_model, pretrained=pretrained,
                                                   force_quick_gelu=bool(tag.get("quick_gelu")))
                finally:
                    logging.getLogger().setLevel(level)
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
                local = _is_path(cfg.dino_model) or not hub_offline_unless_reachable()
                model = Dinov2Model.from_pretrained(cfg.dino_model, local_files_only=local)
            except (OSError, ValueError) as e:
                raise WSSSError(f"could not load DINOv2 {cfg.dino_model!r} ({type(e).__name__}; no network or "
                                f"model hub?): pass a local folder with --dino-model PATH (see data.md), "
                                f"or run offline with --demo / --tiny")
    return model.to(device).eval().requires_grad_(False)


# The tiny pipeline of --tiny: the same diffusers/transformers classes as SD 2.1, small. The VAE keeps SD's
# downsampling factor 8 (four encoder blocks); the UNet has SD's layout of cross-attention down/up blocks, so its
# decoder (up_blocks.1 and .2) holds attn1 self-attention layers at two resolutions.
TINY_SD_UNET = dict(sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(16, 32, 32),
                    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
                    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
                    cross_attention_dim=32, attention_head_dim=4, norm_num_groups=8, use_linear_projection=True)
TINY_SD_VAE = dict(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 8, 16, 16),
                   down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                   layers_per_block=1, norm_num_groups=4, sample_size=64, scaling_factor=0.18215)
TINY_SD_TEXT = dict(vocab_size=49408, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                    max_position_embeddings=77, projection_dim=32)
SD_SCHEDULER = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                    clip_sample=False, set_alpha_to_one=False, steps_offset=1)  # SD's DDIM settings
SD_PNDM = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
               skip_prk_steps=True, set_alpha_to_one=False, steps_offset=1)  # SD 2.1-base's own sampler [I]


def _tiny_sd_tokenizer():
    """A transformers CLIPTokenizer rebuilt from open_clip's bundled BPE (the vocabulary SD's tokenizer uses), pad
    "!" as SD 2.x. transformers 5 needs the vocab=/merges= keywords (vocab_file= silently builds 2 tokens)."""
    import open_clip
    from transformers import CLIPTokenizer
    bpe = open_clip.tokenizer.SimpleTokenizer()
    merges = [m for m, _ in sorted(bpe.bpe_ranks.items(), key=lambda kv: kv[1])]
    return CLIPTokenizer(vocab=dict(bpe.encoder), merges=merges, pad_token="!", bos_token="<start_of_text>",
                         eos_token="<end_of_text>", unk_token="<end_of_text>", model_max_length=77)


# Stable Diffusion 2.1-base's architecture (its published configs), for `--sd-model random`.
SD21_UNET = dict(sample_size=64, cross_attention_dim=1024, attention_head_dim=(5, 10, 20, 20),
                 block_out_channels=(320, 640, 1280, 1280), layers_per_block=2, use_linear_projection=True,
                 down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
                 up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3)
SD21_VAE = dict(block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=4,
                down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4)
SD21_TEXT = dict(vocab_size=49408, hidden_size=1024, intermediate_size=4096, num_hidden_layers=23,
                 num_attention_heads=16, hidden_act="gelu", projection_dim=512, max_position_embeddings=77)


def build_sd(cfg: Config, device) -> SDParts:
    """Frozen Stable Diffusion for DiCLIP: VAE (AutoencoderKL), UNet (UNet2DConditionModel), a DDIM scheduler with the
    model's own noise schedule (the attention pass's one noising step), the cache images' sampler (--cache-scheduler
    model: the checkpoint's own scheduler class, as a plain StableDiffusionPipeline would sample [I]; SD 2.1-base
    ships PNDM, which --tiny and "random" use too; ddim: DDIM), CLIP tokenizer + text encoder. --tiny: the TINY_SD_*
    architecture, random weights seeded by cfg.seed (global RNG untouched); otherwise --sd-model (hub id or a local
    diffusers folder)."""
    import diffusers
    from diffusers import AutoencoderKL, DDIMScheduler, PNDMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed + 2)
        if cfg.tiny:
            vae, unet = AutoencoderKL(**TINY_SD_VAE), UNet2DConditionModel(**TINY_SD_UNET)
            text_encoder, tokenizer = CLIPTextModel(CLIPTextConfig(**TINY_SD_TEXT)), _tiny_sd_tokenizer()
            scheduler, own = DDIMScheduler(**SD_SCHEDULER), PNDMScheduler(**SD_PNDM)
        elif cfg.sd_model == "random":  # SD 2.1-base's architecture with random weights (bench, shape checks)
            vae, unet = AutoencoderKL(**SD21_VAE), UNet2DConditionModel(**SD21_UNET)
            text_encoder, tokenizer = CLIPTextModel(CLIPTextConfig(**SD21_TEXT)), _tiny_sd_tokenizer()
            scheduler, own = DDIMScheduler(**SD_SCHEDULER), PNDMScheduler(**SD_PNDM)
        else:
            if cfg.sd_model.startswith(("/", ".", "~")) and not Path(cfg.sd_model).expanduser().is_dir():
                raise WSSSError(f"Stable Diffusion folder not found: {cfg.sd_model} (pass --sd-model PATH to a "
                                f"diffusers folder with vae/, unet/, text_encoder/, tokenizer/, scheduler/)")
            local = _is_path(cfg.sd_model) or not hub_offline_unless_reachable()
            warnings.filterwarnings("ignore", message=".*local_dir_use_symlinks.*")  # diffusers' own call, not ours
            try:
                # low_cpu_mem_usage=False: what diffusers does without `accelerate`, said explicitly (no warning)
                vae = AutoencoderKL.from_pretrained(cfg.sd_model, subfolder="vae", local_files_only=local,
                                                    low_cpu_mem_usage=False)
                unet = UNet2DConditionModel.from_pretrained(cfg.sd_model, subfolder="unet", local_files_only=local,
                                                            low_cpu_mem_usage=False)
                text_encoder = CLIPTextModel.from_pretrained(cfg.sd_model, subfolder="text_encoder",
                                                             local_files_only=local)
                tokenizer = CLIPTokenizer.from_pretrained(cfg.sd_model, subfolder="tokenizer", local_files_only=local)
                scheduler = DDIMScheduler.from_pretrained(cfg.sd_model, subfolder="scheduler", local_files_only=local)
                own_config = DDIMScheduler.load_config(cfg.sd_model, subfolder="scheduler", local_files_only=local)
                own_class = getattr(diffusers, own_config.get("_class_name", ""), None)
                own = own_class.from_config(own_config) if own_class is not None else scheduler
                if len(tokenizer) != 49408:  # transformers 5 offline returns a 2-token dummy instead of raising
                    raise OSError(f"tokenizer has {len(tokenizer)} tokens, expected 49408")
            except (OSError, ValueError, RuntimeError) as e:
                raise WSSSError(f"could not load Stable Diffusion {cfg.sd_model!r} ({type(e).__name__}; no network "
                                f"or model hub?): pass a local diffusers folder with --sd-model PATH (see data.md), "
                                f"or run offline with --demo / --tiny")
    parts = [m.to(device).eval().requires_grad_(False) for m in (vae, unet, text_encoder)]
    sampler = own if cfg.cache_scheduler == "model" else DDIMScheduler.from_config(scheduler.config)
    return SDParts(*parts[:2], scheduler, tokenizer, parts[2], device, sampler)

def load_assets(cfg: Config, device, need_dino: bool = None, label_path: bool = True,
                tsa_cache: bool = True) -> dict:
    """The frozen models and inputs a run needs, for Frozen: CLIP and its tokenizer (the real checkpoint, the tiny
    test model or, with --demo-model planted, the demo's hand-set model and its lookup-table text bank), DINOv2
    when CD-CLIP's SBE trains (or `need_dino`), Stable Diffusion when DiCLIP's VCE or its SD cache needs it, and
    ExCEL's attribute bank when TSE is on. Without `label_path` (eval: test time is the decoder alone) only CLIP;
    without `tsa_cache` no SD for DiCLIP's cache images (VCE's online SD pass still loads it).
    -> dict(clip, tokenizer, texts (None: encode the prompts), dino, sd, attr_bank (None or (centroids (E, B),
    flags (C, B))))."""
    info = dataset_info(cfg)
    planted = cfg.demo_model == "planted"  # the hand-set CLIP of the demo (see planted_clip)
    if planted:
        import open_clip
        clip = planted_clip().to(device)
        tokenizer = open_clip.get_tokenizer("ViT-B-16", context_length=TOY_CLIP["text_cfg"]["context_length"])
    else:
        clip, tokenizer = build_clip(cfg, device)
    patch = clip.visual.conv1.kernel_size[0]
    if clip_patch_size(cfg) is None and min(cfg.crop_size, cfg.eval_long_side) < patch:
        # validate_config checks this up front when the model name gives the patch size
        raise WSSSError(f"--crop-size {cfg.crop_size} / --eval-long-side {cfg.eval_long_side}: smaller than "
                        f"one CLIP patch ({patch} px for {cfg.clip_model})")
    texts = None
    if planted:  # a lookup table, not encoded prompts: class c -> axis c, background prompts -> axis 0
        supers = info["superclasses"][cfg.superclasses]
        texts = planted_texts(len(info["classes"]) - 1, len(supers), super_class_of(cfg), len(info["bg_prompts"]),
                              clip.text_projection.shape[1]).to(device)
    need_dino = (cfg.lambda_b > 0 if need_dino is None else need_dino) and label_path
    dino = (planted_dino(PLANTED["patch"]).to(device) if planted else build_dino(cfg, device)) if need_dino else None
    # the planted text side knows no attributes: TSE is skipped with it
    bank = attribute_bank(clip, tokenizer, cfg, device) if label_path and cfg.cam == "text" and cfg.tse != "off" \
        and not planted else None
    need_sd = label_path and (cfg.vce or (cfg.tsa != "off" and cfg.cache_source == "sd" and tsa_cache))
    sd = build_sd(cfg, device) if need_sd else None  # DiCLIP: frozen Stable Diffusion
    return dict(clip=clip, tokenizer=tokenizer, texts=texts, dino=dino, sd=sd, attr_bank=bank)


# ----------------------------------------------------------------------------------------------------
# II.5 ExCEL's TSE inputs: description files, built-in sentences, attribute banks and their cache
# ----------------------------------------------------------------------------------------------------

# ---- ExCEL TSE inputs: the attribute descriptions (TSE knowledge base; settings Supp. §1) ----
# wsss.py's own attribute sentences (written for this project, 5 per class), used when neither ExCEL's bank
# (--attr-bank) nor its GPT-4 description JSON (--descriptions) is given. Keys are the dataset's class names;
# each sentence is prefixed "a clean origami <class>." as ExCEL's JSON is.
BUILTIN_DESCRIPTIONS = {
    "voc": {
        "aeroplane": ["it has two long wings.", "it has a tail fin.", "it has a long thin body.",
                      "it has jet engines under the wings.", "it has a row of small windows."],
        "bicycle": ["it has two thin wheels.", "it has pedals and a chain.", "it has handlebars.",
                    "it has a small saddle.", "it has a metal frame of thin tubes."],
        "bird": ["it has feathers.", "it has a pointed beak.", "it has two wings folded at its sides.",
                 "it has thin legs with claws.", "it has a small round head."],
        "boat": ["it floats on water.", "it has a hull.", "it may have a sail or a mast.",
                 "it has a deck.", "it has a pointed bow."],
        "bottle": ["it has a narrow neck.", "it has a cap on top.", "it is made of glass or plastic.",
                   "it has a cylindrical body.", "it may have a label."],
        "bus": ["it is a long vehicle.", "it has many windows in a row.", "it has large wheels.",
                "it has a door for passengers.", "it has a flat front with a windshield."],
        "car": ["it has four wheels.", "it has doors and windows.", "it has headlights.",
                "it has a windshield.", "it has a metal body."],
        "cat": ["it has pointed ears.", "it has whiskers.", "it has soft fur.", "it has a long tail.",
                "it has green or yellow eyes."],
        "chair": ["it has four legs.", "it has a backrest.", "it has a flat seat.",
                  "it is made of wood or metal.", "it may have armrests."],
        "cow": ["it has horns.", "it has a large body with patches.", "it has hooves.",
                "it has an udder.", "it has a long face."],
        "diningtable": ["it has a flat top.", "it has four legs.", "it holds plates and cups.",
                        "it is made of wood.", "it has chairs around it."],
        "dog": ["it has fur.", "it has floppy or pointed ears.", "it has a wet nose.", "it has a wagging tail.",
                "it has four legs and paws."],
        "horse": ["it has a long mane.", "it has hooves.", "it has a long face.", "it has long legs.",
                  "it may carry a saddle."],
        "motorbike": ["it has two wheels.", "it has an engine.", "it has handlebars.", "it has a seat for a rider.",
                      "it has an exhaust pipe."],
        "person": ["it has a head with hair.", "it has arms and hands.", "it wears clothes.",
                   "it has two legs.", "it has a face with eyes."],
        "pottedplant": ["it has green leaves.", "it grows in a pot.", "it has stems.", "it has soil in the pot.",
                        "it may have flowers."],
        "sheep": ["it has thick white wool.", "it has four thin legs.", "it has a small head.",
                  "it has hooves.", "it grazes on grass."],
        "sofa": ["it has soft cushions.", "it has armrests.", "it seats several people.",
                 "it is covered with fabric.", "it has a wide backrest."],
        "train": ["it runs on rails.", "it has many carriages.", "it has a locomotive.",
                  "it has a long body.", "it has many windows."],
        "tvmonitor": ["it has a flat screen.", "it has a thin frame.", "it stands on a base.",
                      "it displays pictures.", "it is rectangular."],
    },
    "synthetic": {
        "red circle": ["it is round.", "it is red.", "it has a smooth curved edge.", "it has no corners.",
                       "it is a filled disc."],
        "blue square": ["it has four equal sides.", "it is blue.", "it has four right angles.",
                        "it has straight edges.", "it is a filled block."],
        "green triangle": ["it has three sides.", "it is green.", "it has three corners.",
                           "it has straight edges.", "it is pointed."],
        "yellow star": ["it has five points.", "it is yellow.", "it has sharp tips.", "it is spiky.",
                        "it has a small centre."],
        "purple ring": ["it is a round band.", "it is purple.", "it has a hole in the middle.",
                        "it is hollow.", "it has a curved edge."],
        "orange cross": ["it has two crossing bars.", "it is orange.", "it looks like a plus sign.",
                         "it has four arms.", "it has right angles."],
    },
}


def description_sentences(cfg: Config) -> dict:
    """{class name: [sentence, ...]} for TSE, from --descriptions (ExCEL's JSON) or wsss.py's own sentences
    (--tse builtin; the synthetic world's default).
    Every bad file is one clear line: missing, not JSON, not {class: [strings]}, unknown or missing classes."""
    classes = dataset_info(cfg)["classes"][1:]
    if not cfg.descriptions:  # --tse builtin, or the synthetic world (validate_config refuses VOC/COCO without it)
        if cfg.dataset not in BUILTIN_DESCRIPTIONS:
            raise WSSSError(f"TSE on {cfg.dataset} needs --descriptions FILE (ExCEL's JSON; see data.md) or "
                            f"--attr-bank FILE, or --tse off")
        own = BUILTIN_DESCRIPTIONS[cfg.dataset]
        return {c: [f"a clean origami {c}. {s}" for s in own[c]] for c in classes}
    path = Path(cfg.descriptions)
    if not path.is_file():
        raise WSSSError(f"--descriptions file not found: {path}")
    try:
        data = json.loads(path.read_text(encoding="utf-8-sig"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise WSSSError(f"--descriptions {path} is not a JSON file ({type(e).__name__}: {e})")
    if not isinstance(data, dict) or not all(isinstance(v, list) and v and all(isinstance(s, str) for s in v)
                                             for v in data.values()):
        raise WSSSError(f"--descriptions {path} must map each class name to a non-empty list of sentences")
    unknown, missing = sorted(set(data) - set(classes)), [c for c in classes if c not in data]
    if unknown or missing:
        raise WSSSError(f"--descriptions {path} does not match the {cfg.dataset} classes: "
                        f"unknown {unknown[:5]}, missing {missing[:5]}")
    return {c: data[c] for c in classes}


def attribute_bank(clip, tokenizer, cfg: Config, device):
    """ExCEL's attribute bank (TSE knowledge base, Supp. §1): centroids A (E, B) and per-class flags (C, B). From
    --attr-bank (ExCEL's .pth [centroids, flags]), else built by cluster_attributes from the description sentences
    (description_sentences). Built banks are cached under cache_dir, keyed by (CLIP, weights, sentences, B, seed),
    written atomically; a corrupt cached bank is rebuilt."""
    E = clip.text_projection.shape[-1] if clip.text_projection is not None else clip.token_embedding.weight.shape[1]
    C = len(dataset_info(cfg)["classes"]) - 1
    if cfg.attr_bank:
        A, flags = read_attr_bank(cfg.attr_bank)
        if A.shape[0] != E or flags.shape != (C, A.shape[1]):
            raise WSSSError(f"--attr-bank {cfg.attr_bank} has centroids {tuple(A.shape)} and flags "
                            f"{tuple(flags.shape)}; this CLIP and dataset need ({E}, B) and ({C}, B)")
        return A.to(device), flags.to(device)
    sentences = description_sentences(cfg)
    flat = [(c, s.lower()) for c, ss in sentences.items() for s in ss]  # ExCEL lower-cases (load_attr.py:26)
    B = tse_num_clusters(cfg, len(flat))
    if len(flat) < B:
        raise WSSSError(f"TSE needs at least B = {B} description sentences, got {len(flat)} (lower --tse-clusters)")
    key = hashlib.sha1(json.dumps([cfg.clip_model, cfg.clip_pretrained, weights_digest(cfg.clip_pretrained,
                                   cfg.cache_dir), flat, B, 0]).encode()).hexdigest()[:12]
    path = Path(cfg.cache_dir) / "tse" / f"{cfg.dataset}-bank-{key}.pt"
    if path.is_file():
        bank = _read_bank(path, str(path))
        if bank is not None and bank[0].shape == (E, B) and bank[1].shape == (C, B) and \
                all(bool(torch.isfinite(t).all()) for t in bank):
            return bank[0].to(device), bank[1].to(device)
        print0(f"TSE: cached attribute bank {path} is unreadable, foreign or not finite; rebuilding it")
    A, flags = cluster_attributes(clip, tokenizer, flat, list(sentences), B, device)
    A, flags = A.cpu(), flags.cpu()
    try:
        atomic_save([A, flags], path)
    except OSError as e:
        print0(f"TSE: could not cache the attribute bank ({e}); it is rebuilt next time")
    print0(f"TSE: {len(flat)} sentences -> {B} attribute centroids (cached {path.name})")
    return A.to(device), flags.to(device)


def weights_digest(p: str, cache_dir) -> str:
    """The content hash of local weights (a file, or a folder such as a diffusers model) that a cache depends on;
    '' for hub ids and "random". Caches are keyed by it, so weights retrained in place are never matched with
    old keys. The sha1 is memoised in <cache_dir>/hashes.json by (path, each file's size and mtime): unchanged
    weights are read once, not on every run."""
    path = Path(p).expanduser() if p else None
    if path is None or not (path.is_file() or path.is_dir()):
        return ""
    files = [path] if path.is_file() else sorted(q for q in path.rglob("*") if q.is_file())
    stamp = hashlib.sha1(json.dumps([(str(f.relative_to(path)) if f != path else "", _stat_key(f))
                                     for f in files]).encode()).hexdigest()
    memo_path, key = Path(cache_dir) / "hashes.json", str(path.resolve())
    try:
        memo = json.loads(memo_path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        memo = {}
    if isinstance(memo, dict) and isinstance(memo.get(key), list) and memo[key][:1] == [stamp]:
        return memo[key][1]
    h = hashlib.sha1()
    for f in files:
        h.update(str(f.relative_to(path) if f != path else "").encode())
        with open(f, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 24), b""):
                h.update(chunk)
    digest = h.hexdigest()[:16]
    memo = memo if isinstance(memo, dict) else {}
    memo[key] = [stamp, digest]
    try:
        atomic_write_text(json.dumps(memo), memo_path)
    except WSSSError:
        pass  # a read-only cache folder only costs hashing again next time
    return digest


def read_attr_bank(path):
    """ExCEL's --attr-bank file: [centroids (E, B), flags (C, B)] of finite numbers, or one line."""
    bank = _read_bank(path, f"--attr-bank {path}")
    if bank is None:
        raise WSSSError(f"--attr-bank {path} is not an attribute bank (expected a .pth list [centroids (E x B), "
                        f"flags (C x B)])")
    if not all(bool(torch.isfinite(t).all()) for t in bank):
        raise WSSSError(f"--attr-bank {path} holds NaN or infinite values: it is damaged (re-download ExCEL's bank, "
                        f"or use --descriptions FILE)")
    return bank


def _read_bank(path, what: str):
    """[centroids (E, B), flags (C, B)] from a .pth file, or None if it is not one (truncated, foreign)."""
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise WSSSError(f"{what}: file not found")
    except Exception:
        return None
    if not (isinstance(obj, (list, tuple)) and len(obj) == 2 and all(torch.is_tensor(t) and t.dim() == 2
                                                                     for t in obj)):
        return None
    return obj[0].float().contiguous(), obj[1].float()


# ----------------------------------------------------------------------------------------------------
# II.6 DiCLIP's TSA cache on disk: generated images, the resumable build, the manifest
# ----------------------------------------------------------------------------------------------------

TSA_FORMAT = "wsss-diclip-tsa-cache-v1"


# SD is prompted with plain class names [I] (§IV-B: "{category} denotes the queried class"): the dataset tables'
# joined names spelled out.
PLAIN_NAMES = {"diningtable": "dining table", "pottedplant": "potted plant", "tvmonitor": "tv monitor",
               "motorbike": "motorbike", "aeroplane": "aeroplane"}


def _settings_hash(d: dict) -> str:
    return hashlib.sha1(json.dumps(d, sort_keys=True).encode()).hexdigest()[:12]


def tsa_settings(cfg: Config) -> dict:
    """The manifest's settings part: every TSA_KEYS field, the class names, and the content hash of local CLIP and
    SD weights (JSON-able)."""
    s = {k: getattr(cfg, k) for k in TSA_KEYS}
    s.update(format=TSA_FORMAT, classes=dataset_info(cfg)["classes"])
    # local weights by their contents (a path alone would match weights retrained in place)
    s.update({f"{k}_sha1": weights_digest(getattr(cfg, k), cfg.cache_dir) for k in ("clip_pretrained", "sd_model")
              if _is_path(getattr(cfg, k))})
    if cfg.cache_source == "synthetic":  # the stand-in renderer ignores the SD generation settings
        for k in ("cache_steps", "cache_guidance", "cache_prompt"):
            s[k] = None
    return s


def tsa_cache_path(cfg: Config) -> Path:
    return Path(cfg.cache_dir) / "tsa" / f"{cfg.dataset}-{cfg.cache_source}-{_settings_hash(tsa_settings(cfg))}.pt"


def tsa_image_dir(cfg: Config) -> Path:
    key = {k: getattr(cfg, k) for k in TSA_IMAGE_KEYS}
    return Path(cfg.cache_dir) / "tsa-images" / f"{cfg.dataset}-{cfg.cache_source}-{_settings_hash(key)}"


def ensure_writable(folder) -> Path:
    """Create `folder` and check a file can be written there; else one clear line."""
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / f".write-test-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise WSSSError(f"cache directory {folder} is not writable ({type(e).__name__}: {e.strerror or e}): pass "
                        f"--cache-dir DIR (or set WSSS_CACHE) to a writable folder")
    return folder


def _valid_image(path: Path) -> bool:
    from PIL import Image
    try:
        with Image.open(path) as im:
            im.load()  # a truncated PNG fails here
        return True
    except (OSError, SyntaxError, ValueError):
        return False


def _atomic_png(rgb: np.ndarray, path: Path):
    save_image(rgb, path)


def sd_image_maker(sd: SDParts, cfg: Config, steps: int = None):
    """(class id, class name, seed) -> uint8 (S, S, 3): one image from a diffusers StableDiffusionPipeline assembled
    from the loaded parts (sampler: sd.sampler), prompt cfg.cache_prompt, cache_steps steps (`steps`: fewer, for
    bench's timing), guidance cache_guidance, cache_image_size^2."""
    from diffusers import StableDiffusionPipeline
    pipe = StableDiffusionPipeline(vae=sd.vae, text_encoder=sd.text_encoder, tokenizer=sd.tokenizer, unet=sd.unet,
                                   scheduler=sd.sampler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    S = cfg.cache_image_size

    def make(cls: int, name: str, seed: int) -> np.ndarray:
        with torch.no_grad(), fp32(sd.device):
            out = pipe(cfg.cache_prompt.format(category=PLAIN_NAMES.get(name, name)), height=S, width=S,
                       num_inference_steps=steps or cfg.cache_steps, guidance_scale=cfg.cache_guidance,
                       generator=torch.Generator().manual_seed(seed), output_type="np").images[0]  # (S, S, 3) in [0,1]
        return np.clip(np.rint(out * 255), 0, 255).astype(np.uint8)
    return make


def synthetic_image_maker(size: int):
    """STAND-IN for SD generation (the demo, cache_source=synthetic): the synthetic world's renderer draws one
    object of the class, centred, on its noisy background. The rest of the cache path is the real one."""
    return lambda cls, name, seed: draw_single_class_scene(np.random.default_rng([7, seed]), cls, size)[0]


def generate_cache_images(image_dir, classes, n_per_class: int, make_image, log=print0) -> list:
    """Generate n_per_class images per (class id, name) in `classes` with make_image(cls, name, seed = 1000 cls + i)
    [I], each written atomically as <image_dir>/c<cls>_<i>.png as soon as it is made. Resumable: existing readable
    files are kept (a truncated one is made again), so an interrupted build continues where it stopped and a
    re-run makes nothing. -> [(cls, path)] for every image."""
    image_dir = ensure_writable(image_dir)
    items = [(c, name, i, image_dir / f"c{c:03d}_{i:04d}.png") for c, name in classes for i in range(n_per_class)]
    todo = [it for it in items if not _valid_image(it[3])]
    if todo:
        log(f"TSA cache: generating {len(todo)} of {len(items)} single-class images into {image_dir}")
        bar = _progress(todo, what="TSA cache images")
        for c, name, i, path in bar:
            _atomic_png(make_image(c, name, 1000 * c + i), path)
        bar.close()
    return [(c, path) for c, _, _, path in items]


def build_tsa_cache(cfg: Config, make_image, feature_fn, pseudo_mask_fn, texts_fg, device=None, batch_size: int = 8,
                    log=print0) -> dict:
    """DiCLIP's offline phase on disk (§III-B, §III-D.1, Eqs. 8-10; generation settings §IV-B): generate
    cache_images_per_class single-class images per class (resumable), then per batch: crops resized to crop_size
    and normalised as training crops (B, 3, S, S) -> pool_cache_features (feature_fn: F_v (B, N, D) unit
    features; pseudo_mask_fn: (B, S, S) label maps, DiCLIP: VCE + CAM + CAA + PAR; mask average pooling, Eq. 8;
    images with < 1 % or > 99 % fg skipped); per-class and background K-means -> {K, V} (build_kv_cache).
    Written atomically with a manifest (settings, counts, image hashes) to tsa_cache_path(cfg); an existing cache
    with the same settings is loaded instead (no work).
    -> dict(format, manifest, keys, values, key_class)."""
    from PIL import Image
    settings, path = tsa_settings(cfg), tsa_cache_path(cfg)
    cached = load_tsa_cache(path, settings)
    if cached is not None:
        return cached
    ensure_writable(path.parent)
    names = dataset_info(cfg)["classes"]
    classes = [(c, names[c]) for c in range(1, len(names))]
    items = generate_cache_images(tsa_image_dir(cfg), classes, cfg.cache_images_per_class, make_image, log)
    fg_by_class, bg, used, hashes = {}, [], {}, {}
    S = cfg.crop_size
    for start in _progress(range(0, len(items), batch_size), what="TSA cache features and pseudo masks"):
        chunk = items[start:start + batch_size]
        rgbs = [np.asarray(Image.fromarray(load_rgb(p)).resize((S, S), Image.BILINEAR)) for _, p in chunk]
        images = torch.stack([normalize_image(r, cfg.norm) for r in rgbs])
        images = images.to(device) if device is not None else images
        cls = torch.tensor([c for c, _ in chunk], device=images.device)
        f_fg, f_bg, valid = pool_cache_features(images, cls, feature_fn, pseudo_mask_fn)
        for j, (c, p) in enumerate(chunk):
            hashes[p.name] = hashlib.sha1(p.read_bytes()).hexdigest()[:16]
            if valid[j]:
                fg_by_class.setdefault(c, []).append(f_fg[j].cpu())
                bg.append(f_bg[j].cpu())
                used[c] = used.get(c, 0) + 1
    skipped = len(items) - sum(used.values())
    if skipped:
        log(f"TSA cache: skipped {skipped} of {len(items)} images whose pseudo mask covered < 1 % or > 99 %")
    if not bg:
        raise WSSSError("TSA cache: no generated image gave a usable pseudo mask (all < 1 % or > 99 % foreground)")
    kv = build_kv_cache({c: torch.stack(v) for c, v in fg_by_class.items()}, torch.stack(bg), texts_fg,
                        cfg.cache_per_class, cfg.cache_bg, seed=0, log=log)
    manifest = dict(settings=settings, images_per_class={names[c]: used.get(c, 0) for c, _ in classes},
                    skipped=skipped, num_keys=len(kv["keys"]), image_dir=str(tsa_image_dir(cfg)), image_sha1=hashes)
    cache = dict(format=TSA_FORMAT, manifest=manifest, **kv)
    try:
        atomic_save(cache, path)
        atomic_write_text(json.dumps(manifest, indent=1, sort_keys=True), path.with_suffix(".json"))
    except OSError as e:
        raise WSSSError(f"cannot write the TSA cache {path} ({type(e).__name__}: {e}): pass --cache-dir DIR")
    log(f"TSA cache: {len(kv['keys'])} keys ({int((kv['key_class'] > 0).sum())} foreground) -> {path}")
    return cache


def ensure_tsa_cache(frozen, cfg: Config, device) -> dict:
    """DiCLIP's {K, V}: loaded from the cache folder, or built there (resumable, see build_tsa_cache) with the real
    label path (tsa_label_fns: features = VCE-calibrated tokens, pseudo mask = patch-text CAM -> CAA -> PAR of the
    image's one class, no cache involved)."""
    feature_fn, pseudo_mask_fn = tsa_label_fns(frozen, cfg)
    if cfg.cache_source == "synthetic":
        if cfg.dataset != "synthetic":
            raise WSSSError("--cache-source synthetic draws the synthetic world's shapes: use it with "
                            "--dataset synthetic (real datasets need --cache-source sd)")
        make_image = synthetic_image_maker(cfg.cache_image_size)
    else:
        make_image = sd_image_maker(frozen.sd, cfg)
    cache = build_tsa_cache(cfg, make_image, feature_fn, pseudo_mask_fn, frozen.cam_texts[: frozen.num_fg], device)
    return dict(keys=cache["keys"].float().to(device), values=cache["values"].float().to(device),
                manifest=cache["manifest"])


def load_tsa_cache(path, expected: dict):
    """The TSA cache at `path` if it was built with the `expected` settings (tsa_settings); None if there is no
    file (build it). A truncated or foreign file, or one built with other settings -> one clear WSSSError (a
    stale cache is never used silently)."""
    path = Path(path)
    if not path.is_file():
        return None
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated zip, pickle garbage, ...
        raise WSSSError(f"TSA cache {path} is unreadable ({type(e).__name__}; truncated or not a torch file): "
                        f"delete it to rebuild")
    if not isinstance(obj, dict) or obj.get("format") != TSA_FORMAT or not {"manifest", "keys", "values"} <= set(obj):
        raise WSSSError(f"{path} is not a TSA cache of this program (no {TSA_FORMAT!r} header): delete it or pass "
                        f"another --cache-dir")
    got = obj["manifest"].get("settings", {})
    diff = [k for k in sorted(set(got) | set(expected)) if got.get(k) != expected.get(k)]
    if diff:
        shown = ", ".join(f"{k}: {got.get(k)!r} vs now {expected.get(k)!r}" for k in diff[:3])
        raise WSSSError(f"TSA cache {path} was built with other settings ({shown}{', ...' if len(diff) > 3 else ''})"
                        f": delete it to rebuild")
    keys, values = obj["keys"], obj["values"]
    if not (torch.is_tensor(keys) and torch.is_tensor(values)) or keys.ndim != 2 or values.ndim != 2 or \
            len(keys) != len(values) or values.shape[1] != len(expected.get("classes", [])) or \
            not (torch.isfinite(keys).all() and torch.isfinite(values).all()):
        print0(f"TSA cache {path} is inconsistent or not finite: rebuilding it (its generated images are kept)")
        return None
    return obj


# ----------------------------------------------------------------------------------------------------
# II.7 Checkpoints and resume
# ----------------------------------------------------------------------------------------------------

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
    """One dict: unwrapped decoder (no `module.` prefix), optimizer, scaler, step, config, RNG states, and the
    class table (names, prompts, background words, super-classes), so predict needs nothing of the dataset."""
    info = dict(dataset_info(cfg))
    atomic_save(dict(decoder=decoder.state_dict(), optimizer=optimizer.state_dict(), info=info,
                     scaler=scaler.state_dict() if scaler else None, step=step, config=dataclasses.asdict(cfg),
                     best_miou=best, rng=rng_state(), world_size=dist_info()[1], version=1), path)


def read_checkpoint(path, hint: str = "") -> dict:
    """A checkpoint file of this program, or one line: missing (with `hint`), unreadable, foreign."""
    if not Path(path).is_file():
        raise WSSSError(f"checkpoint not found: {path}{hint}")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:
        raise WSSSError(f"cannot read checkpoint {path}: {type(e).__name__}: {e}")
    if not isinstance(ckpt, dict) or "decoder" not in ckpt or not isinstance(ckpt.get("config", {}), dict):
        raise WSSSError(f"{path} is not a wsss.py checkpoint")
    return ckpt


def load_checkpoint(path, cfg: Config, keys=MODEL_KEYS) -> dict:
    """Load a checkpoint and refuse one whose config differs in `keys` (MODEL_KEYS or RESUME_KEYS)."""
    return check_checkpoint(read_checkpoint(path), path, cfg, keys)


def check_checkpoint(ckpt: dict, path, cfg: Config, keys=MODEL_KEYS) -> dict:
    """Refuse a read checkpoint whose weights are not finite, whose config differs from cfg in `keys`, or whose
    classes differ from cfg's dataset. -> ckpt."""
    check_finite_state(ckpt["decoder"], path)
    saved = ckpt.get("config", {})
    was = {k: saved.get(k, getattr(Config, k)) for k in keys}  # keys added later: the old default
    diff = [f"{k}={was[k]!r} (now {getattr(cfg, k)!r})" for k in keys if was[k] != getattr(cfg, k)]
    if diff:
        raise WSSSError(f"checkpoint {path} was trained with another config: {', '.join(diff)}")
    saved_classes = ckpt.get("info", {}).get("classes")
    if saved_classes is not None and list(saved_classes) != list(dataset_info(cfg)["classes"]):
        now = dataset_info(cfg)["classes"]
        first = next((i for i, (a, b) in enumerate(zip(saved_classes, now)) if a != b),
                     min(len(now), len(saved_classes)))
        raise WSSSError(f"checkpoint {path} was trained on other classes ({len(saved_classes) - 1} vs "
                        f"{len(now) - 1} here; first difference at class {first}: "
                        f"{saved_classes[first] if first < len(saved_classes) else '-'!r} vs "
                        f"{now[first] if first < len(now) else '-'!r})")
    return ckpt


def check_finite_state(state: dict, path):
    """A checkpoint's weights must be numbers: NaN or inf (a diverged run, a damaged file) is one line."""
    bad = [k for k, v in state.items() if torch.is_tensor(v) and v.is_floating_point() and not torch.isfinite(v).all()]
    if bad:
        raise WSSSError(f"checkpoint {path} has NaN or infinite weights ({bad[0]}{', ...' if len(bad) > 1 else ''}): "
                        f"the run diverged or the file is damaged; use an earlier ckpt-NNNNNN.pt")


def check_resume(ckpt: dict, cfg: Config):
    """--resume rules beyond the config keys: the checkpoint is before --max-steps (else nothing would run and
    the old model would be logged under a new step), and it was written by as many processes as this run has
    (each rank's data order depends on the world size; checkpoints older than this check do not say)."""
    step, world, saved = int(ckpt.get("step", 0)), dist_info()[1], ckpt.get("world_size")
    if step >= cfg.max_steps:
        raise WSSSError(f"checkpoint {cfg.resume} is at step {step}, and --max-steps is {cfg.max_steps}: nothing to "
                        f"train; pass --max-steps > {step} to extend the run, or evaluate it with "
                        f"`wsss.py eval --ckpt {cfg.resume}`")
    if saved is not None and saved != world:
        raise WSSSError(f"checkpoint {cfg.resume} was written by {saved} process(es) and this run has {world}: the "
                        f"data order depends on the number of processes, so resume it with the same command "
                        + ("in one process (python wsss.py train ...)" if saved == 1 else
                           f"under torchrun --nproc_per_node={saved} (torchrun --nproc_per_node={saved} wsss.py "
                           f"train ...)"))


def trim_metrics(path, step: int):
    """--resume: drop the lines of metrics.jsonl that the interrupted run logged after `step` (and a line torn
    by kill -9), so that no step appears twice once the run continues."""
    path = Path(path)
    if not path.is_file():
        return
    keep = []
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            rec = json.loads(line)
        except ValueError:
            continue
        if isinstance(rec, dict) and isinstance(rec.get("step"), int) and rec["step"] <= step:
            keep.append(line + "\n")
    atomic_write_text("".join(keep), path)


def claim_run_folder(cfg: Config) -> RunLock:
    """Rank 0, before anything is built: create --out-dir, lock it (RunLock), remove temp files of saves that
    were interrupted, and apply the overwrite policy: a folder that holds a run (metrics.jsonl or checkpoints)
    is refused unless --resume continues it or --overwrite replaces it (its metrics and checkpoints are
    deleted; other files stay)."""
    out = make_dir(cfg.out_dir, "--out-dir")
    lock = RunLock(out).acquire()
    try:
        clean_stale_temps(out)
        previous = [p for p in (out / "metrics.jsonl", Path(cfg.ckpt)) if p.is_file()]
        previous += sorted(p for p in out.glob("ckpt-*.pt") if p not in previous)
        if previous and not cfg.resume:
            if not cfg.overwrite:
                raise WSSSError(f"--out-dir {out} already holds a run ({previous[0].name}): pass --overwrite to "
                                f"replace it, --resume {cfg.ckpt} to continue it, or another --out-dir")
            for p in previous:
                p.unlink()
            print0(f"--overwrite: removed the previous run's metrics and checkpoints from {out}")
    except BaseException:
        lock.release()
        raise
    return lock


# ----------------------------------------------------------------------------------------------------
# II.8 A training run and a dataset's evaluation: folders, logging, checkpoints, tables, DenseCRF, overlays
# ----------------------------------------------------------------------------------------------------

def train(cfg: Config, frozen: Frozen = None) -> dict:
    """Train the decoder on the method's pseudo-labels; returns the final evaluation results. `frozen` may
    inject pre-built frozen models (the planted-signal test does). Around the run itself (_train): the run
    folder (rank 0 locks it and applies the overwrite policy, every rank hears the outcome) and Ctrl-C
    (GracefulStop in the loop; elsewhere KeyboardInterrupt) -> RunInterrupted, which main reports."""
    setup_distributed(cfg)
    lock, stop = on_rank0(claim_run_folder, cfg), GracefulStop()
    main_thread = threading.current_thread() is threading.main_thread()
    term = signal.signal(signal.SIGTERM, _raise_terminated) if main_thread else None  # SIGTERM = Ctrl-C
    try:
        return _train(cfg, frozen, stop)
    except KeyboardInterrupt as e:  # while building or in the final evaluation: nothing half-done to save
        step, path = stop.saved or (None, None)
        raise RunInterrupted(step, path, finished=step == cfg.max_steps,
                             signum=signal.SIGTERM if isinstance(e, Terminated) else signal.SIGINT) from None
    finally:
        stop.restore()
        if main_thread:
            signal.signal(signal.SIGTERM, term if term is not None else signal.SIG_DFL)
        if lock is not None:
            lock.release()


def _train(cfg: Config, frozen: Frozen, stop: GracefulStop) -> dict:
    device = setup_distributed(cfg)
    rank, world, _ = dist_info()
    ckpt = load_checkpoint(cfg.resume, cfg, RESUME_KEYS) if cfg.resume else None  # refused before any work
    if ckpt is not None:
        check_resume(ckpt, cfg)
        stop.saved = (int(ckpt["step"]), cfg.resume)
    seed_everything(cfg.seed)  # same decoder initialisation on every rank (DDP also broadcasts it)
    if cfg.demo:
        prepare_demo(cfg)
    ctx, amp_dtype = autocast_ctx(cfg, device)
    train_set = SegDataset(cfg, cfg.train_split, train=True)  # data errors first: they are the cheap ones
    val_set = SegDataset(cfg, cfg.val_split, train=False)
    scored = val_set.masks > 0  # your own data may have no masks: nothing to score, training is the same
    if not scored:
        print0(f"data: the {cfg.val_split} split has no masks, so validation is skipped (the decoder is trained all "
               f"the same; `wsss.py predict` writes its masks)")
    frozen = frozen or Frozen(cfg, device)
    decoder = build_decoder(cfg, frozen).to(device)
    optimizer = torch.optim.AdamW(param_groups(decoder, cfg), lr=cfg.lr, betas=(cfg.beta1, cfg.beta2),
                                  weight_decay=cfg.weight_decay)
    scaler = torch.amp.GradScaler("cuda") if amp_dtype == torch.float16 else None
    start, best = 0, float("nan")
    if ckpt is not None:
        decoder.load_state_dict(ckpt["decoder"])
        optimizer.load_state_dict(ckpt["optimizer"])
        if scaler and ckpt.get("scaler"):
            scaler.load_state_dict(ckpt["scaler"])
        start, best = ckpt["step"], ckpt.get("best_miou", best)
        set_rng_state(ckpt["rng"])
        print0(f"resumed from {cfg.resume} at step {start}")
        if rank == 0:
            trim_metrics(Path(cfg.out_dir) / "metrics.jsonl", start)
    model = decoder if world == 1 else torch.nn.parallel.DistributedDataParallel(
        decoder, device_ids=[device.index] if device.type == "cuda" else None)
    sampler = EpochSampler(len(train_set), cfg.batch_size, cfg.seed, start, rank, world, cfg.overfit_batch)
    loader = torch.utils.data.DataLoader(train_set, batch_sampler=sampler, num_workers=cfg.num_workers,
                                         pin_memory=device.type == "cuda", worker_init_fn=_ignore_sigint,
                                         generator=torch.Generator().manual_seed(cfg.seed))  # keeps global RNG
    out_dir = Path(cfg.out_dir)
    if rank == 0:
        out_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(json.dumps(dataclasses.asdict(cfg), indent=1, default=str), out_dir / "config.json")
    n_params = sum(p.numel() for p in decoder.parameters())
    print0(f"config: {out_dir / 'config.json'} (every setting of this run)")
    print0(f"device {device} | amp {amp_dtype} | world {world} | train {len(train_set)} | val {len(val_set)} | "
           f"CLIP {clip_description(cfg)} blocks {frozen.num_blocks} | "
           f"DINOv2 {'on' if frozen.dino is not None else 'off'} | trainable params {n_params:,}")
    metrics_path = out_dir / "metrics.jsonl"
    pl_conf = torch.zeros(len(dataset_info(cfg)["classes"]), len(dataset_info(cfg)["classes"]),
                          dtype=torch.long, device=device)
    bar = _progress(range(start, cfg.max_steps), disable=rank != 0)
    t0, last = time.time(), {}

    def batches():  # the loader's batches; before each step every rank learns of a Ctrl-C or a failure anywhere
        data, step = iter(loader), start
        while True:
            failure, batch = None, None
            try:
                batch = next(data)
            except Exception as e:  # e.g. a bad image met by one rank's loader: that rank reports it (agree)
                failure = e if not stop.requested else None  # a SIGTERM to the group also ended the workers
            if agree(failure, stop.requested):  # Ctrl-C on any rank: every rank stops before this step
                bar.close()
                if step > start and (stop.saved is None or stop.saved[0] != step):
                    if rank == 0:
                        save_checkpoint(cfg.ckpt, decoder, optimizer, scaler, step, cfg, best)
                    stop.saved = (step, cfg.ckpt)
                raise RunInterrupted(*(stop.saved or (None, None)), signum=stop.signum)
            yield batch
            step += 1

    def after_step(done, batch, loss, parts, pl, lr):  # diagnostics, logging, validation, checkpoints
        nonlocal best, last
        pl_conf.add_(confusion_matrix(pl["Y"], batch["mask"].to(device), pl_conf.shape[0]))  # crop GT vs label
        last = dict(step=done, loss=loss.item(), **parts, lr=lr)
        bar.update(1)
        bar.set_postfix(loss=f"{last['loss']:.3f}", lr=f"{lr:.1e}")
        if done % cfg.log_every == 0 or done == cfg.max_steps:
            ms = 1000 * (time.time() - t0) / (done - start)
            last.update(pseudo_miou=miou(all_reduce_sum(pl_conf))["miou"], ms_per_step=ms)  # since the last log line
            pl_conf.zero_()
            extra = "".join(f" | {k} {last[k]:.3f}" for k in ("aff", "b") if k in last)
            pm = "n/a" if math.isnan(last["pseudo_miou"]) else f"{100 * last['pseudo_miou']:.1f}"  # no masks
            print0(f"step {done:05d}/{cfg.max_steps} | loss {last['loss']:.3f} | seg {last['seg']:.3f}{extra} | "
                   f"pseudo-label mIoU {pm} | lr {lr:.1e} | {ms:.0f} ms")
            if rank == 0:
                append_line(json.dumps(last), metrics_path)
        if cfg.eval_every and scored and done % cfg.eval_every == 0 and done < cfg.max_steps:
            res = evaluate(decoder, frozen, val_set, cfg, device, dropout=cfg.upstream)  # upstream: Dropout2d on
            best = max(best, res["decoder"]["miou"]) if not math.isnan(best) else res["decoder"]["miou"]
            print0(f"step {done:05d} | val mIoU {100 * res['decoder']['miou']:.1f}")
        if rank == 0 and (done % cfg.save_every == 0 or done == cfg.max_steps):
            save_checkpoint(cfg.ckpt, decoder, optimizer, scaler, done, cfg, best)
            stop.saved = (done, cfg.ckpt)
            if done % cfg.save_every == 0 and done < cfg.max_steps:
                save_checkpoint(out_dir / f"ckpt-{done:06d}.pt", decoder, optimizer, scaler, done, cfg, best)

    stop.install()  # Ctrl-C from here on: the step finishes, every rank stops, rank 0 saves (GracefulStop)
    train_loop(model, frozen, optimizer, scaler, cfg, start, batches(), ctx, after_step)
    bar.close()
    if agree(None, stop.requested):  # the signal came during the last step: it is saved, stop before evaluating
        raise RunInterrupted(*(stop.saved or (None, None)), finished=True, signum=stop.signum)
    stop.restore()  # the final evaluation: Ctrl-C stops it at once (the trained checkpoint is saved)
    if cfg.demo and not cfg.save_vis:
        cfg.save_vis = str(out_dir / "vis")
    labelled = cfg.demo or cfg.eval_cams
    if not scored:
        print0(f"trained {cfg.max_steps} steps -> {cfg.ckpt} (no {cfg.val_split} masks: not scored)")
        return dict(results={}, last=last)
    # the pseudo-label columns show the labels of the trained state: the dynamic path (the decoder's affinity) if
    # training reached it, else the static one it trained on
    results = evaluate(decoder, frozen, val_set, cfg, device, cams=labelled, oracle=labelled,
                       label_dynamic=cfg.max_steps > cfg.rfm_dynamic_after)
    if labelled:  # raw CAM | refined | +PAR | decoder, then the perfect-affinity ceiling (a diagnostic)
        results = {k: results[k] for k in ("cam", "refined", "refined+PAR", "decoder", "oracle", "oracle+PAR")}
    if cfg.demo:  # and the two baselines, side by side
        results.update(demo_baselines(cfg, val_set, device))
    names = dataset_info(cfg)["classes"]
    print0(format_table(results, names, title=f"{cfg.method} (refine {cfg.refine}) on {cfg.dataset} {cfg.val_split} "
                                              f"({min(len(val_set), cfg.max_images or len(val_set))} images)"))
    print0(table_legend(results, cfg, steps=cfg.max_steps))
    if cfg.save_vis:
        print0(f"overlays (image | CAM | pseudo-label | prediction | truth): {cfg.save_vis}/")
    if rank == 0:
        append_line(json.dumps(dict(step=cfg.max_steps, val={k: v["miou"] for k, v in results.items()})),
                    metrics_path)
    if world > 1:  # verify what DDP promises: every rank ends with the same decoder
        flat = torch.cat([p.detach().flatten() for p in decoder.parameters()])
        gathered = [torch.zeros_like(flat) for _ in range(world)]
        torch.distributed.all_gather(gathered, flat)
        diff = max(float((g - flat).abs().max()) for g in gathered)
        print0(f"DDP: decoder parameters across {world} ranks differ by at most {diff:.3g}")
        torch.distributed.destroy_process_group()
    return dict(results=results, last=last)


def evaluate(decoder, frozen: Frozen, dataset: SegDataset, cfg: Config, device, cams: bool = False,
             label_decoder=None, oracle: bool = False, dropout: bool = False, label_dynamic: bool = True) -> dict:
    """mIoU of the decoder's multi-scale+flip prediction on a split (optionally DenseCRF; skipped when decoder
    is None), and with `cams` of the label-driven pseudo-labels of the same images (raw CAM, refined, after
    PAR: the papers' "M" column; with a decoder, RFM runs dynamic, as upstream's val mode). Also writes
    overlays with --save-vis. Shards over DDP ranks and sums the confusion matrices. `dropout` keeps the decoder in
    training mode, as upstream's in-training validation did (--upstream). `label_dynamic` False: the pseudo-labels
    take the static path even with a decoder (a run that ended before its dynamic phase)."""
    K = len(dataset_info(cfg)["classes"])
    names = (["decoder"] if decoder is not None else []) + (["cam", "refined", "refined+PAR"] if cams else []) \
        + (["oracle", "oracle+PAR"] if cams and oracle else [])
    conf = {n: torch.zeros(K, K, dtype=torch.long, device=device) for n in names}
    if decoder is not None and not dropout:  # upstream's validate() never called eval(): Dropout2d stayed on
        decoder.eval()  # [upstream bug fixed]
    vis_dir = make_dir(cfg.save_vis, "--save-vis") if cfg.save_vis else None
    pseudo_dir = make_dir(cfg.save_pseudo, "--save-pseudo") if cams and cfg.save_pseudo else None
    failure = None
    rank = dist_info()[0]
    for i in _progress(shard(min(len(dataset), cfg.max_images or len(dataset))), disable=rank != 0,
                       what="evaluating" if not cams else "pseudo-labels"):
        try:
            item = dataset[i]
        except Exception as e:  # a bad image on one DDP rank: that rank reports it, the others stop (agree)
            failure = e
            break
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
            pl = label_variants(frozen, image, item["label"][None].to(device), cfg,
                                (decoder if decoder is not None else label_decoder) if label_dynamic else None,
                                gt=gt if oracle else None, lvc_cam=decoder is None) if has_fg else {}
            for name in names:
                if name != "decoder":
                    conf[name] += confusion_matrix(pl[name][0] if has_fg else torch.zeros_like(gt), gt, K)
            if pseudo_dir is not None:  # what training would use: the refined pseudo-label after PAR
                save_label_png((pl["refined+PAR"][0] if has_fg else torch.zeros_like(gt)).cpu().numpy(),
                               pseudo_dir / f"{item['name']}.png")
            if want_vis:  # the panels with content: no prediction without a decoder, no truth without a mask
                cam = pl["cam_map"][0].cpu().numpy() if has_fg else np.zeros(gt.shape)
                pseudo = pl["refined+PAR"][0] if has_fg else torch.zeros_like(gt)
                planes = [t.cpu().numpy().astype(np.uint8) if keep else None for t, keep in
                          ((pseudo, True), (pred, decoder is not None), (gt, bool((gt != IGNORE).any())))]
                save_overlay(vis_dir / f"{item['name'].replace('/', '_')}.png",
                             denormalize_image(item["image"], cfg.norm), cam, *planes, cfg=cfg)
    if decoder is not None:
        decoder.train()
    agree(failure)
    return {name: miou(all_reduce_sum(c)) for name, c in conf.items()}


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


COLUMN_MEANINGS = {
    "cam": "the raw CAM's pseudo-labels (from the image-level labels)",
    "refined": "after the method's refinement ({refine})",
    "refined+PAR": "after PAR: the pseudo-labels training uses",
    "decoder": "the trained decoder's prediction (multi-scale{crf}): what the method outputs",
    "oracle": "the raw CAMs propagated by the PERFECT affinity built from the true masks (reads the ground truth: "
              "the ceiling of any refinement)",
    "oracle+PAR": "the same, after PAR",
    "random CLIP": "the pseudo-labels of a random-weight CLIP (a floor)",
    "all-bg": "background everywhere (a floor)",
}


def table_legend(results: dict, cfg: Config, steps: int = None) -> str:
    """The lines under a results table: what each column is, that every column is scored against the masks
    (and which columns use them as input), what FP/TP means, and one sentence that reads the result."""
    lines = ["columns: " + "; ".join(f"{n} = " + COLUMN_MEANINGS[n].format(refine=cfg.refine,
                                                                         crf=", DenseCRF" if cfg.crf else "")
                                     for n in results if n in COLUMN_MEANINGS),
             "every column is scored against the true masks (IoU per class, mIoU their mean); only the oracle "
             "columns also read them as input. FP/TP: false-positive pixels per true-positive pixel (mean over "
             "classes; lower is better)."]
    m = {n: 100 * r["miou"] for n, r in results.items()}
    said = []
    if "cam" in m and "refined" in m:
        said.append(f"the refinement moves the raw CAM's mIoU by {m['refined'] - m['cam']:+.1f} "
                    f"({m['cam']:.1f} -> {m['refined']:.1f})")
    if "refined" in m and "refined+PAR" in m:
        said.append(f"PAR by {m['refined+PAR'] - m['refined']:+.1f}")
    if "oracle+PAR" in m:
        said.append(f"a perfect affinity would reach {m['oracle+PAR']:.1f}")
    if "decoder" in m:
        said.append(f"the decoder reaches {m['decoder']:.1f}" + (f" after {steps} steps" if steps else ""))
    if said:
        lines.append("reading: " + "; ".join(said) + ".")
    return "\n".join(lines)


CRF_MISSING = "--crf needs DenseCRF: pip install pydensecrf2==1.1 (builds from source with g++)"


def crf_refine(rgb: np.ndarray, probs: np.ndarray, cfg: Config) -> np.ndarray:
    """DenseCRF with WeCLIP's test parameters. rgb uint8 (H, W, 3), probs (K, H, W) -> labels (H, W)."""
    try:
        import pydensecrf.densecrf as dcrf
        from pydensecrf.utils import unary_from_softmax
    except ImportError:
        raise WSSSError(CRF_MISSING)
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


def save_label_png(labels, path):
    """A label map (H, W) of class ids (255 ignore) as an index PNG with the VOC palette, written atomically: the
    format of VOC's SegmentationClass (read back with PIL as the ids themselves)."""
    from PIL import Image
    im = Image.fromarray(np.asarray(labels, dtype=np.uint8), mode="P")
    im.putpalette(palette(256).flatten().tolist())
    _atomic(path, lambda tmp: im.save(tmp, format="PNG"))


OVERLAY_SHORT, OVERLAY_LONG = 256, 512  # panel: small images enlarged to 256 px short side, large shrunk
OVERLAY_TITLES = {"image": "image ({w}x{h} px, shown x{s})", "cam": "CAM (refined; max over classes)",
                  "pseudo": "pseudo-label (refined+PAR)", "pred": "prediction (decoder)", "gt": "truth"}


def class_colours(cfg=None) -> np.ndarray:
    """The overlays' class colours, (256, 3) uint8: the synthetic world's classes in the colours their names say
    (the badges' TOY_RGB: "blue square" blue), background black, 255 (ignore) white; VOC, COCO and custom data the
    VOC colour map. Overlays only: index PNGs keep palette(), the format of VOC's masks."""
    pal = palette(256)
    if cfg is not None and cfg.dataset == "synthetic":
        for k, (colour, _) in enumerate(TOY_SHAPES, 1):
            pal[k] = TOY_RGB[colour]
    return pal


def legend_entries(planes, names, colours) -> list:
    """An overlay's legend: (name, (r, g, b)) of every class id present in the label planes (None skipped), in id
    order; 255 is "ignore", an id beyond the class table "class K"."""
    ids = sorted(set().union(*(np.unique(np.asarray(p, np.int64)).tolist() for p in planes if p is not None)))
    return [("ignore" if k == IGNORE else names[k] if k < len(names) else f"class {k}",
             tuple(int(v) for v in colours[k])) for k in ids]


def heat_colours(cam) -> np.ndarray:
    """A CAM in [0, 1] as colours, float (..., 3) in [0, 255]: blue (low) -> green -> red (high)."""
    cam = np.clip(np.asarray(cam, np.float32), 0, 1)
    return np.stack([cam, 1 - np.abs(2 * cam - 1), 1 - cam], -1) * 255


def overlay_figure(rgb, cam, pseudo, pred, gt, cfg=None) -> np.ndarray:
    """The overlay of one image as a uint8 (H, W, 3) picture a person can read: a titled panel per input that is
    not None (image | CAM heat-map | pseudo-label | prediction | truth; labels blended on the dimmed image in
    class_colours), each enlarged to >= 256 px on its short side (nearest: the model's own pixels) or shrunk to a
    512 px long side; under them the CAM's colour bar (low..high) and a legend of the classes present."""
    from PIL import Image, ImageDraw, ImageFont
    rgb = np.asarray(rgb, np.uint8)
    h, w = rgb.shape[:2]
    s = min(max(1.0, OVERLAY_SHORT / min(h, w)), OVERLAY_LONG / max(h, w))
    size = (max(1, round(w * s)), max(1, round(h * s)))  # PIL order (W, H)

    def resized(a, nearest):
        return np.asarray(Image.fromarray(a).resize(size, Image.NEAREST if nearest else Image.BILINEAR))

    names = dataset_info(cfg)["classes"] if cfg is not None else []
    colours = class_colours(cfg)
    big = resized(rgb, nearest=s >= 1).astype(np.float32)  # labels always nearest, the CAM bilinear
    panels = [("image", big)]
    if cam is not None:
        panels.append(("cam", 0.5 * big + 0.5 * heat_colours(resized(np.asarray(cam, np.float32), nearest=False))))
    planes = {k: np.asarray(v, np.uint8) for k, v in (("pseudo", pseudo), ("pred", pred), ("gt", gt)) if v is not None}
    for key, lab in planes.items():
        lab = resized(lab, nearest=True)
        panels.append((key, np.where((lab == 0)[..., None], 0.6 * big, 0.4 * big + 0.6 * colours[lab])))
    legend = legend_entries(planes.values(), names, colours)

    try:  # Pillow's embedded default font (no font file), at a readable size where FreeType is built in
        font = ImageFont.load_default(size=13)
    except (ImportError, OSError, TypeError):
        font = ImageFont.load_default()  # the bitmap font
    text_w = lambda t: int(math.ceil(font.getlength(t)))  # noqa: E731
    line, pad, box = font.getbbox("Ag")[3] + 4, 8, 12
    titles = [OVERLAY_TITLES[k].format(w=w, h=h, s=f"{s:.3g}") for k, _ in panels]
    cells = [max(size[0], text_w(t) + 4) for t in titles]
    items = [box + 4 + text_w(name) + 2 * pad for name, _ in legend]
    width = max(pad + sum(c + pad for c in cells), max(items, default=0) + 2 * pad, 200)
    rows, x = [[]], pad
    for item, entry in zip(items, legend):  # the legend wraps at the figure's width
        if x + item > width - pad and rows[-1]:
            rows.append([])
            x = pad
        rows[-1].append((x, entry))
        x += item
    bar_h = 10 + line if cam is not None else 0
    top = pad + line
    height = top + size[1] + pad + bar_h + (pad if bar_h else 0) + len(rows) * (box + 6) + pad
    fig = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(fig)
    x = pad
    for (key, panel), title, cell in zip(panels, titles, cells):
        draw.text((x + (cell - text_w(title)) // 2, pad), title, fill="black", font=font)
        fig.paste(Image.fromarray(np.clip(np.rint(panel), 0, 255).astype(np.uint8)), (x + (cell - size[0]) // 2, top))
        if key == "cam":  # the colour bar under the CAM panel: the heat-map's colours from low to high
            y = top + size[1] + pad
            ramp = heat_colours(np.linspace(0, 1, cell))[None].repeat(10, 0)
            fig.paste(Image.fromarray(ramp.astype(np.uint8)), (x, y))
            draw.text((x, y + 12), "low", fill="black", font=font)
            draw.text((x + cell - text_w("high"), y + 12), "high", fill="black", font=font)
        x += cell + pad
    y = top + size[1] + pad + bar_h + (pad if bar_h else 0)
    for row in rows:
        for x, (name, colour) in row:
            draw.rectangle([x, y, x + box - 1, y + box - 1], fill=colour, outline="black")
            draw.text((x + box + 4, y), name, fill="black", font=font)
        y += box + 6
    return np.asarray(fig)


def save_overlay(path, rgb, cam, pseudo, pred, gt, cfg=None):
    """One readable overlay PNG (overlay_figure: image | CAM heat-map | pseudo-label | prediction | truth, the
    panels given, titles, colour bar, legend), written atomically. Drawing only: no pseudo-label changes."""
    save_image(overlay_figure(rgb, cam, pseudo, pred, gt, cfg), path)


# ----------------------------------------------------------------------------------------------------
# II.9 The synthetic world (the demo's data)
# ----------------------------------------------------------------------------------------------------

TOY_RGB = {"red": (220, 40, 40), "blue": (40, 70, 220), "green": (40, 180, 60), "yellow": (235, 215, 40),
           "purple": (150, 50, 190), "orange": (245, 140, 30)}
BODY_RGB = [(120, 85, 60), (50, 120, 120), (85, 90, 135), (115, 120, 55), (180, 160, 135), (150, 110, 130)]
SYNTH_WORLD = "badges-2"  # the world's version: part of the demo's cached dataset and toy-CLIP names
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


def _toy_background(rng: np.random.Generator, size: int):
    """A random grey level, a low-frequency texture and pixel noise -> pixel centres (yy, xx), image (H, W, 3)."""
    yy, xx = np.mgrid[0:size, 0:size] + 0.5
    freq, phase = rng.uniform(0.05, 0.3, 2), rng.uniform(0, 2 * np.pi, 2)
    texture = 18 * np.sin(freq[0] * xx + phase[0]) * np.cos(freq[1] * yy + phase[1])
    return yy, xx, rng.uniform(90, 160) + texture[..., None] + rng.normal(0, 12, (size, size, 3))


def _paint(image, inside, rgb, rng: np.random.Generator, jitter: float = 20):
    """Fill `inside` with rgb, a per-region colour jitter and per-pixel noise."""
    image[inside] = np.array(rgb) + rng.uniform(-jitter, jitter, 3) + rng.normal(0, 8, (int(inside.sum()), 3))


def _rotated(xx, yy, cx, cy, a: float):
    """Pixel coordinates in a frame centred at (cx, cy) and rotated by a."""
    return (xx - cx) * np.cos(a) + (yy - cy) * np.sin(a), -(xx - cx) * np.sin(a) + (yy - cy) * np.cos(a)


def _draw_object(image, mask, rng: np.random.Generator, xx, yy, c: int, cx: float, cy: float, rb: float,
                 layout: list = None):
    """One object of class c: an elliptic body (semi-axes rb, e rb; a colour from BODY_RGB, shared by all
    classes) and, overlapping its rim, the class's badge (its TOY_SHAPES shape in its TOY_RGB colour, radius
    0.6-0.7 rb, centred 0.7 of the way from the body's centre to its rim). The mask labels body and badge c."""
    a, e = rng.uniform(0, 2 * np.pi), rng.uniform(0.75, 1.0)
    u, v = _rotated(xx, yy, cx, cy, a)
    body = (u / rb) ** 2 + (v / (e * rb)) ** 2 <= 1
    body_rgb = int(rng.integers(len(BODY_RGB)))
    _paint(image, body, BODY_RGB[body_rgb], rng)
    phi, rh, spin = rng.uniform(0, 2 * np.pi), rb * rng.uniform(0.6, 0.7), rng.uniform(0, 2 * np.pi)
    bu, bv = 0.7 * rb * np.cos(phi), 0.7 * e * rb * np.sin(phi)  # badge centre in the body's frame
    hx, hy = cx + bu * np.cos(a) - bv * np.sin(a), cy + bu * np.sin(a) + bv * np.cos(a)
    badge = _shape_mask(TOY_SHAPES[c - 1][1], *_rotated(xx, yy, hx, hy, spin), rh)
    _paint(image, badge, TOY_RGB[TOY_SHAPES[c - 1][0]], rng, jitter=25)
    mask[body | badge] = c
    if layout is not None:
        layout.append(dict(cls=c, body=(cx, cy, rb, e * rb, a), body_rgb=body_rgb, badge=(hx, hy, rh, spin)))


def draw_toy_scene(rng: np.random.Generator, size: int = 64, layout: list = None):
    """One scene of the synthetic world, built so that CAMs under-activate (see the README's demo section):
    1-2 objects of distinct classes (one large and near the centre, or two in separate quadrants), each a body
    in a class-free colour carrying its class's badge, over at most one distractor (a class colour on another
    class's shape, labelled background: colour alone does not tell the class), on a noisy textured background.
    An image-level classifier needs only the badge; the mask is the whole object. Returns (image uint8
    (H, W, 3), mask uint8 (H, W) with class ids 0..6, sorted class ids present, a caption naming exactly those
    classes in random order). `layout`, if a list, receives one dict per object (its geometry)."""
    yy, xx, image = _toy_background(rng, size)
    mask = np.zeros((size, size), np.uint8)
    k = int(rng.integers(1, 3))
    classes = rng.permutation(len(TOY_SHAPES))[:k] + 1
    quadrants = rng.permutation(4)
    for j in range(int(rng.integers(0, 2))):  # the distractor first, so an object may cover part of it
        colour, shape = rng.choice(len(TOY_SHAPES), 2, replace=False)
        q, r = quadrants[k + j], size * rng.uniform(0.08, 0.11)
        cx = size * (0.25 + 0.5 * (q % 2) + rng.uniform(-0.08, 0.08))
        cy = size * (0.25 + 0.5 * (q // 2) + rng.uniform(-0.08, 0.08))
        inside = _shape_mask(TOY_SHAPES[shape][1], *_rotated(xx, yy, cx, cy, rng.uniform(0, 2 * np.pi)), r)
        _paint(image, inside, TOY_RGB[TOY_SHAPES[colour][0]], rng, jitter=25)
    for j, c in enumerate(classes):
        if k == 1:
            rb, (cx, cy) = size * rng.uniform(0.22, 0.3), size * (0.5 + rng.uniform(-0.12, 0.12, 2))
        else:
            q, rb = quadrants[j], size * rng.uniform(0.17, 0.22)
            cx = size * (0.25 + 0.5 * (q % 2) + rng.uniform(-0.03, 0.03))
            cy = size * (0.25 + 0.5 * (q // 2) + rng.uniform(-0.03, 0.03))
        _draw_object(image, mask, rng, xx, yy, int(c), cx, cy, rb, layout)
    present = sorted(int(c) for c in np.unique(mask) if c > 0)  # an object can never vanish, but be exact
    names = [f"a {SYNTH_CLASSES[c]}" for c in rng.permutation(present)]
    listed = names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]
    caption = CAPTION_TEMPLATES[int(rng.integers(len(CAPTION_TEMPLATES)))].format(listed)
    return np.clip(image, 0, 255).astype(np.uint8), mask, present, caption


def draw_single_class_scene(rng: np.random.Generator, cls: int, size: int = 64):
    """One object of class `cls` (1..6), large and near the centre, on draw_toy_scene's kind of background: the
    demo's stand-in for DiCLIP's SD-generated single-class images (the "centered, fully visible" prompt).
    Returns (image uint8 (H, W, 3), mask uint8 (H, W) with ids {0, cls})."""
    yy, xx, image = _toy_background(rng, size)
    mask = np.zeros((size, size), np.uint8)
    rb, (cx, cy) = size * rng.uniform(0.22, 0.3), size * (0.5 + rng.uniform(-0.1, 0.1, 2))
    _draw_object(image, mask, rng, xx, yy, cls, cx, cy, rb)
    return np.clip(image, 0, 255).astype(np.uint8), mask


def make_synthetic_dataset(root, num_images: int = 200, image_size: int = 64, seed: int = 0,
                           layout: str = "voc") -> Path:
    """Write the synthetic world in the VOC layout: JPEGImages/*.jpg, SegmentationClass/*.png (exact masks),
    ImageSets/Segmentation/{train,val}.txt (val holds num_images // 4 further images). Deterministic in seed.
    layout "custom": the your-own-data format instead (classes.txt, superclasses.txt, images/, train.csv and
    val.csv with the image-level labels, masks/ for the val images only: training reads no mask)."""
    root = Path(root)
    if layout == "custom":
        return _synthetic_custom(root, num_images, image_size, seed)
    for sub in ("JPEGImages", "SegmentationClass", "ImageSets/Segmentation"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    splits = {"train": range(num_images), "val": range(num_images, num_images + max(1, num_images // 4))}
    for split, ids in splits.items():
        names = []
        for i in ids:
            image, mask, _, _ = draw_toy_scene(np.random.default_rng([seed, i]), image_size)
            name = f"synth_{i:05d}"
            save_image(image, root / "JPEGImages" / f"{name}.jpg", quality=95)
            save_image(mask, root / "SegmentationClass" / f"{name}.png", mode="L")
            names.append(name)
        atomic_write_text("\n".join(names) + "\n", root / "ImageSets" / "Segmentation" / f"{split}.txt")
    return root


def _synthetic_custom(root: Path, num_images: int, image_size: int, seed: int) -> Path:
    """The synthetic world in the custom layout (the same images and val masks as the VOC layout's)."""
    for sub in ("images", "masks"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    names = SYNTH_CLASSES[1:]
    atomic_write_text("".join(f"{n}\n" for n in names), root / "classes.txt")
    atomic_write_text("".join(f"{s}: {', '.join(m)}\n" for s, m in SYNTH_SUPER[3].items()), root / "superclasses.txt")
    atomic_write_text(json.dumps({c: [f"a clean origami {c}. {t}" for t in BUILTIN_DESCRIPTIONS["synthetic"][c]]
                                  for c in names}, indent=1), root / "descriptions.json")
    splits = {"train": range(num_images), "val": range(num_images, num_images + max(1, num_images // 4))}
    for split, ids in splits.items():
        rows = ["image,labels"]
        for i in ids:
            image, mask, _, _ = draw_toy_scene(np.random.default_rng([seed, i]), image_size)
            name = f"synth_{i:05d}"
            save_image(image, root / "images" / f"{name}.jpg", quality=95)
            if split == "val":
                save_image(mask, root / "masks" / f"{name}.png", mode="L")
            rows.append(f"{name}.jpg," + ";".join(names[c - 1] for c in np.unique(mask) if 0 < c < len(names) + 1))
        atomic_write_text("\n".join(rows) + "\n", root / f"{split}.csv")
    return root


# ----------------------------------------------------------------------------------------------------
# II.10 The demo's toy CLIP: contrastive pre-training from scratch on the synthetic world (pretrain-toy)
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
        torch.manual_seed(cfg.toy_seed)
        clip = open_clip.CLIP(**TOY_CLIP).to(device)
        tokenizer = open_clip.get_tokenizer("ViT-B-16", context_length=TOY_CLIP["text_cfg"]["context_length"])
        opt = torch.optim.AdamW(clip.parameters(), lr=cfg.toy_lr, weight_decay=cfg.toy_weight_decay,
                                betas=(0.9, 0.98))  # CLIP's betas
        warm = max(1, int(cfg.toy_steps * cfg.toy_warmup))
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda k: min(1.0, (k + 1) / warm) * 0.5 * (
            1 + math.cos(math.pi * min(1.0, max(0, k - warm) / max(1, cfg.toy_steps - warm)))))
        rng = np.random.default_rng([cfg.toy_seed, 7])
        held_out = toy_batch(np.random.default_rng([cfg.toy_seed, 8]), 200, cfg.norm)
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
    log(f"toy CLIP: zero-shot mAP {map0:.2f} -> {map1:.2f} on 200 held-out scenes (chance ~0.25) in "
        f"{time.time() - t0:.0f} s; saved {path}")
    return dict(loss_first=float(np.mean(losses[:5])), loss_last=float(np.mean(losses[-5:])), map_before=map0,
                map_after=map1, path=str(path), seconds=time.time() - t0)


# ----------------------------------------------------------------------------------------------------
# II.11 The demo's planted CLIP (--demo-model planted): hand-set weights that under-activate on purpose
# ----------------------------------------------------------------------------------------------------

# The planted model is the clearly labelled alternative to the pre-trained toy CLIP: nothing in it is learned.
# Every weight of a real open_clip.CLIP (and of a real transformers Dinov2Model) is set by hand so that the two
# things the CAM refinements are about are planted, visibly and exactly:
#   * an IMPERFECT CAM: class evidence lives only in the tokens of the BADGE (the class colour). The body of an
#     object, in a class-free colour, carries none, so the raw CAM (GradCAM, or the patch-text CAM of the
#     calibrated path) lights a part of each object: what a real CLIP does with a discriminative part.
#   * SEMANTIC ATTENTION: later blocks attend within "objectness" (coloured vs grey) and locally, so the tokens
#     of one object (body and badge) attend to each other, background to background, and two objects in one
#     image, in separate quadrants, stay mostly apart (locality only: an honest, imperfect separation).
# The label path is untouched: Frozen only swaps in these weights and text embeddings.
# Decisions: the text bank is a lookup table (planted_texts), so ExCEL's TSE is skipped (there are no attribute
# sentences to encode: --tse is ignored with the planted model); DiCLIP's VCE still adds the tiny random SD's
# attention to the calibrated blocks, where it only perturbs the patch-text CAM (compare --no-vce), and the TSA
# cache is built from the planted features like any other.
# Measured on the demo's val split (60 images, training-free): raw CAM ~30 mIoU (all-background ~11), refined
# ~67-79, +PAR ~69-87; the perfect-affinity oracle (oracle_affinity) +PAR ~90.
PLANTED = dict(patch=4, width=64, layers=7, mlp_ratio=8, embed_dim=16,
               ballast=10.0,        # b: the constant of each ballast slot (10 slots: every LayerNorm ~ identity)
               margin=100.0,        # a: nearest-centroid margins are 1/a (chroma units of 1/100, squared / 2)
               sharp=10.0,          # K: GELU(K z) / K stands in for ReLU(z) (error <= 0.017 / K)
               colour_beta=1.0,     # blocks 1-2: beta <chroma_i, chroma_j> (same-colour attention)
               colour_gamma=0.1,    # ... - gamma |token distance|^2 (early blocks are local: ~2 tokens)
               object_beta=5.0,     # blocks 3..7: beta sigma_i sigma_j, sigma = +1 object / -1 background
               object_gamma=0.02,   # ... - gamma |token distance|^2 (a length scale of ~5 tokens)
               readout=1.0,         # gamma_out: the last block writes back its attention read-out of (E, B)
               logit_scale=10.0)    # the planted CLIP's temperature (the GradCAM softmax with --cam-logit-scale 0)

# Residual-stream slots (feature f stored as +f in channel s and -f in channel s + width/2, so the token mean is 0)
_PS = dict(rgb=0, pos=3, pos2=5, cls=6, votes=7, cls_ev=14, obj=20, bg=21, ballast=22)  # ballast: slots 22..31


def planted_centroids():
    """The colour centroids of the planted model, in CHROMA space (RGB / 100 minus its grey mean: the luminance is
    dropped, so the background's random grey level does not matter): index 0 grey (chroma 0), 1..6 the class
    colours TOY_RGB (in TOY_SHAPES order), 7..12 the body colours BODY_RGB. -> (13, 3) float tensor."""
    cols = np.array([(100, 100, 100)] + [TOY_RGB[c] for c, _ in TOY_SHAPES] + list(BODY_RGB), float) / 100
    return torch.tensor(cols - cols.mean(1, keepdims=True), dtype=torch.float32)


def planted_texts(num_fg: int, num_super: int, super_of, num_bg: int, dim: int):
    """The planted text bank, laid out as Frozen.texts: class c -> axis c, super-class -> the (normalised) sum of
    its members' axes, every background prompt -> axis 0. -> (C + Ns + Nb, dim) unit rows."""
    t = torch.zeros(num_fg + num_super + num_bg, dim)
    t[:num_fg, 1:num_fg + 1] = torch.eye(num_fg)
    for s in range(num_super):
        t[num_fg + s, 1 + torch.nonzero(super_of[1:].cpu() == s + 1)[:, 0]] = 1
    t[num_fg + num_super:, 0] = 1
    return F.normalize(t, dim=-1)


def planted_clip(image_size: int = 64):
    """The planted CLIP: a real open_clip.CLIP (7 blocks, width 64, one head, patch 4: 16 x 16 tokens on 64 px),
    every vision weight set by hand; the text tower stays random and unused (Frozen injects planted_texts).

    Residual stream. Each feature f sits in a slot s as +f (channel s) and -f (channel s + 32), so every token's
    channel mean is exactly 0, and 10 BALLAST slots hold b = 10 in every token (norm Z = b sqrt(10) ~ 32). A
    LayerNorm with weight Z sqrt(2/D) then returns x Z / sqrt(Z^2 + |f|^2): a per-token scale within ~1-2 % of 1
    (|f|^2 <= ~30), so every ln_pre / ln_1 / ln_2 / ln_post is nearly the identity for the features, and a
    read-out simply reads the + channel. (The decoder reads this stream too: the ballast channels are constants
    it has to learn to ignore, like the massive activations of a real CLIP; a larger b would make LayerNorm more
    exact and the decoder slower to train.) Slots (_PS):
      rgb   the patch's mean colour RGB / 100 (conv1 undoes the input normalisation; the means come from the
            positional embedding, which is the conv's missing bias)
      pos   the token's grid position (column, row) / 8, centred; pos2 its squared norm; cls 1 on the CLS token
      votes block 1's MLP: for each target t in {grey, 6 class colours}, V_t = (1/12) sum over the 12 other
            centroids k of clamp(a (s_k - s_t) + 1, 0, 1), with the nearest-centroid score
            s_k = <chroma, c_k> - |c_k|^2 / 2: V_t = 0 iff t beats every other centroid by a margin 1/a
      cls_ev block 2's MLP: class evidence E_c = ReLU(1 - 12 V_c): 1 on a badge-coloured token of class c, else 0
      obj   block 2's MLP: objectness O = 1 - ReLU(1 - 12 V_grey) (1 unless grey is the nearest colour)
      bg    block 2's MLP: background B = 1 - O
    (ReLU is GELU(K z) / K, K = 10; a clamp is ReLU(z) - ReLU(z - 1).)

    Attention (q = W_q a + b_q, k = W_k a; open_clip's 1/sqrt(64) is undone in W_q; the CLS token's key gets
    -1e4, so no patch attends to it):
      blocks 1-2  logit_ij = beta_c <chroma_i, chroma_j> - gamma_c |P_i - P_j|^2 (P in tokens): same-colour
                  tokens attend to each other, locally. A body attends to its body, a badge to its badge.
      blocks 3-7  logit_ij = beta_o sigma_i sigma_j - gamma_o |P_i - P_j|^2 with sigma = O - B: object tokens
                  (body AND badge) attend to the object tokens near them, background to background. Two objects
                  of one image sit in separate quadrants: locality alone keeps them mostly apart (imperfectly).
    q . k uses the row-constant trick: -gamma |P_i - P_j|^2 = 2 gamma <P_i, P_j> - gamma |P_j|^2 - gamma |P_i|^2,
    and the last term cancels in the row softmax (q gets a constant 1 from its bias, k reads the pos2 slot).
    Read-out. Blocks 1-6 write nothing back (out_proj = 0): their maps exist for the refinements to use, and never
    carry evidence into a body before the last block. Block 7 reads v = (E, B) and writes it back (out_proj =
    gamma_out I): a body token's OUTPUT then holds its object's mean evidence, as a real CLIP's last layers
    spread the class over the object (CD-CLIP's class distributions and the decoder see it), while GradCAM's
    hooked activation is that block's INPUT, where the body has E = 0: GradCAM's gradient flows through this
    attention (values, and q . k via the objectness and position slots), but ReLU(<alpha, a_n>) stays on the
    badges (test_planted_cam_is_the_badge measures it). The calibrated path (ExCEL's SVC in blocks 3-7, DiCLIP's
    VCE in 5-7) starts from block 3's / 5's input, after the two MLPs, so its patch-text CAM sees E_c of the
    badge plus the read-out of one block: the badge too. That is why there are 7 blocks: ExCEL calibrates the
    last 5, and class evidence needs two MLPs before them.
    MLPs of blocks 3-7 are zero. proj maps E_c to text axis c and B to axis 0 (the background prompts).
    Returns the CLIP in eval mode, requires_grad False. Deterministic (no random numbers drawn by the caller)."""
    import open_clip
    P = PLANTED
    p, D, L = P["patch"], P["width"], P["layers"]
    H = D // 2
    n_ballast = H - _PS["ballast"]
    Z = P["ballast"] * math.sqrt(n_ballast)  # the ballast's norm (per half of the stream)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)  # the unused random text tower
        clip = open_clip.CLIP(embed_dim=P["embed_dim"], vision_cfg=dict(
            image_size=image_size, layers=L, width=D, head_width=D, patch_size=p, mlp_ratio=P["mlp_ratio"]),
            text_cfg=dict(context_length=TOY_CLIP["text_cfg"]["context_length"], vocab_size=49408, width=32,
                          heads=1, layers=1))
    v = clip.visual
    g = image_size // p
    cent = planted_centroids()  # (13, 3)
    K, a, sharp = cent.shape[0], P["margin"], P["sharp"]
    targets = list(range(7))  # grey and the 6 class colours
    std, mean = torch.tensor(IMAGENET_STD) / 100, torch.tensor(IMAGENET_MEAN) / 100
    C = torch.eye(3) - 1 / 3  # chroma = C rgb

    with torch.no_grad():
        for prm in v.parameters():
            prm.zero_()
        clip.logit_scale.fill_(math.log(P["logit_scale"]))
        for ln in [v.ln_pre, v.ln_post] + [m for blk in v.transformer.resblocks for m in (blk.ln_1, blk.ln_2)]:
            ln.weight.fill_(Z * math.sqrt(2 / D))
        # conv1: the patch's mean colour (RGB / 100) from the normalised input; its mean from the positional bias
        for ch in range(3):
            v.conv1.weight[_PS["rgb"] + ch, ch] = std[ch] / p ** 2
            v.conv1.weight[_PS["rgb"] + ch + H, ch] = -std[ch] / p ** 2
        pos = torch.zeros(1 + g * g, D)
        pos[1:, _PS["rgb"]:_PS["rgb"] + 3], pos[1:, H + _PS["rgb"]:H + _PS["rgb"] + 3] = mean, -mean
        rr, cc = torch.meshgrid(torch.arange(g), torch.arange(g), indexing="ij")
        xy = torch.stack([cc.flatten(), rr.flatten()], 1).float()
        xy = (xy - (g - 1) / 2) / 8  # (N, 2): column, row, centred, in units of 8 tokens
        for j, col in enumerate((xy[:, 0], xy[:, 1], (xy ** 2).sum(1))):
            pos[1:, _PS["pos"] + j], pos[1:, H + _PS["pos"] + j] = col, -col
        pos[0, _PS["cls"]], pos[0, H + _PS["cls"]] = 1, -1
        pos[:, _PS["ballast"]:H], pos[:, H + _PS["ballast"]:] = P["ballast"], -P["ballast"]
        v.positional_embedding.copy_(pos)
        blocks = v.transformer.resblocks
        rgb = slice(_PS["rgb"], _PS["rgb"] + 3)
        # block 1's MLP: the pairwise nearest-centroid votes V_t
        fc1, pr1 = blocks[0].mlp.c_fc, blocks[0].mlp.c_proj
        u = 0
        for t in targets:
            for k in range(K):
                if k == t:
                    continue
                d = cent[k] - cent[t]  # z = a (s_k - s_t) + 1 = a <rgb, d> - a (|c_k|^2 - |c_t|^2) / 2 + 1
                w, b = a * (C @ d), 1 - a * ((cent[k] ** 2).sum() - (cent[t] ** 2).sum()) / 2
                for off in (0.0, 1.0):  # clamp(z, 0, 1) = ReLU(z) - ReLU(z - 1)
                    fc1.weight[u, rgb], fc1.bias[u] = sharp * w, sharp * (b - off)
                    sign = 1 if off == 0 else -1
                    pr1.weight[_PS["votes"] + t, u] = sign / (sharp * (K - 1))
                    pr1.weight[H + _PS["votes"] + t, u] = -sign / (sharp * (K - 1))
                    u += 1
        # block 2's MLP: E_c = ReLU(1 - 12 V_c), B = ReLU(1 - 12 V_grey), O = 1 - B
        fc2, pr2 = blocks[1].mlp.c_fc, blocks[1].mlp.c_proj
        for t in targets:
            fc2.weight[t, _PS["votes"] + t], fc2.bias[t] = -sharp * (K - 1), sharp
            out = _PS["bg"] if t == 0 else _PS["cls_ev"] + t - 1
            pr2.weight[out, t], pr2.weight[H + out, t] = 1 / sharp, -1 / sharp
        pr2.weight[_PS["obj"], 0], pr2.weight[H + _PS["obj"], 0] = -1 / sharp, 1 / sharp
        pr2.bias[_PS["obj"]], pr2.bias[H + _PS["obj"]] = 1, -1
        # attention: q rows 0..D-1, k rows D..2D-1, v rows 2D..3D-1 of in_proj
        root = math.sqrt(D)  # undoes nn.MultiheadAttention's 1/sqrt(head_dim) on q
        for i, blk in enumerate(blocks):
            W, bias = blk.attn.in_proj_weight, blk.attn.in_proj_bias
            if i == L - 1:  # v = (E, B); out_proj writes the read-out back at gamma_out
                for j, s in enumerate(list(range(_PS["cls_ev"], _PS["cls_ev"] + 6)) + [_PS["bg"]]):
                    W[2 * D + j, s] = 1
                    blk.attn.out_proj.weight[s, j], blk.attn.out_proj.weight[H + s, j] = P["readout"], -P["readout"]
            colour = i < 2
            beta, gamma = (P["colour_beta"], P["colour_gamma"]) if colour else (P["object_beta"], P["object_gamma"])
            if colour:  # q/k dims 0..2: sqrt(beta) chroma
                W[0:3, rgb], W[D:D + 3, rgb] = root * math.sqrt(beta) * C, math.sqrt(beta) * C
            else:  # q/k dim 0: sqrt(beta) (O - B)
                for s, sg in ((_PS["obj"], 1), (_PS["bg"], -1)):
                    W[0, s], W[D, s] = root * math.sqrt(beta) * sg, math.sqrt(beta) * sg
            # dims 3, 4: sqrt(2 gamma) P (P = 4 pos in tokens); dim 5: q = 1 (bias), k = -gamma |P|^2 - 1e4 cls
            for j in range(2):
                W[3 + j, _PS["pos"] + j] = root * math.sqrt(2 * gamma) * 8
                W[D + 3 + j, _PS["pos"] + j] = math.sqrt(2 * gamma) * 8
            bias[5] = root
            W[D + 5, _PS["pos2"]], W[D + 5, _PS["cls"]] = -gamma * 64, -1e4
        # proj: E_c -> text axis c, B -> axis 0 (the background prompts)
        for c in range(6):
            v.proj[_PS["cls_ev"] + c, 1 + c] = 1
        v.proj[_PS["bg"], 0] = 1
    return clip.eval().requires_grad_(False)


def planted_dino(patch: int = 4, image_size: int = 64, grey: float = 0.1):
    """A transformers Dinov2Model set by hand for CD-CLIP's SBE: the patch embedding (with its bias) computes the
    patch's chroma (RGB / 100 minus its grey mean) and a constant `grey` channel, each stored as +f and -f (so
    the final LayerNorm's mean subtraction is void and it only rescales); every layer is switched off by a
    zero layer-scale. A token's feature direction is then its hue: the tokens of one coloured region get
    near-identical features, as DINOv2 gives the parts of a real object, and the grey background (chroma ~0)
    points along the constant channel, nearly orthogonal to every coloured token. (Unlike the CLIP above, it
    does not know that a body and its badge belong together: a prototype pooled from both matches both only
    partly.)"""
    from transformers import Dinov2Config, Dinov2Model
    std, mean = torch.tensor(IMAGENET_STD) / 100, torch.tensor(IMAGENET_MEAN) / 100
    C = torch.eye(3) - 1 / 3  # chroma = C rgb
    dino = Dinov2Model(Dinov2Config(hidden_size=8, num_hidden_layers=1, num_attention_heads=1, mlp_ratio=1,
                                    patch_size=patch, image_size=image_size))
    with torch.no_grad():
        for prm in dino.parameters():
            prm.zero_()
        proj = dino.embeddings.patch_embeddings.projection
        w = (C * std)[:, :, None, None].expand(3, 3, patch, patch) / patch ** 2  # rgb = x std + mean, patch mean
        proj.weight[:3], proj.weight[3:6] = w, -w
        proj.bias[:3], proj.bias[3:6], proj.bias[6], proj.bias[7] = C @ mean, -(C @ mean), grey, -grey
        dino.layernorm.weight.fill_(1)
    return dino.eval().requires_grad_(False)


# ----------------------------------------------------------------------------------------------------
# II.12 The demo: presets, assets, baselines
# ----------------------------------------------------------------------------------------------------

# --demo: the synthetic world, a short schedule, and one of two CLIPs (README "What --demo shows"): the PLANTED one
# (default: hand-set weights whose attention is semantic, so each refinement visibly completes the objects; fast,
# no pre-training) or --demo-model toy (pre-trained on first use; its attention is too diffuse to help).
DEMO = dict(dataset="synthetic", tiny=True, demo_model="planted", batch_size=8, eval_every=0, num_workers=0,
            demo_images=240, eval_long_side=64, warmup_steps=20,
            cam_logit_scale=0.0,  # the demo CLIPs' own temperature, not OpenAI CLIP's 100
            cam_contrast_floor=0.05)  # the toy's diffuse attention leaves flat refined CAMs: guard them (README)
DEMO_ROUTES = {
    # planted: 400 steps on the static label path (the dynamic switch is after the run) and a smaller decoder,
    # so that the first command finishes in about two minutes on 2 CPU cores [I: chosen on the train split's
    # loss and time, not on the val images]
    "planted": dict(max_steps=400, log_every=100, rfm_dynamic_after=1000, dec_dim=128, dec_mlp=512, lr=4e-3),
    "toy": dict(max_steps=300, log_every=50, rfm_dynamic_after=150),
}


def prepare_demo(cfg: Config):
    """--demo assets, made on first use and then reused from cache_dir: the synthetic dataset and the
    pre-trained toy CLIP. Rank 0 makes them; other DDP ranks wait."""
    on_rank0(_demo_assets, cfg)
    if cfg.demo_model == "planted":
        print0("demo: CLIP is the PLANTED model (hand-set weights, no training: its CAM lights the badges only, its "
               "attention follows objectness; see planted_clip)" + ("; DINOv2 is planted too (colour profiles)"
                                                                      if cfg.lambda_b > 0 else ""))
        return
    print0("demo: CLIP is the toy CLIP pre-trained on the synthetic world" + (
        "; DINOv2 is a tiny random-weight model (so SBE's prototypes carry no real boundary knowledge here)"
        if cfg.lambda_b > 0 else ""))


def _demo_assets(cfg: Config):
    root = Path(cfg.data_root)
    if not (root / ".complete").is_file():
        print0(f"demo: writing the synthetic dataset ({cfg.demo_images} train images) to {root}")
        make_synthetic_dataset(make_dir(root, "demo data"), cfg.demo_images, 64, seed=0)
        atomic_write_text("ok\n", root / ".complete")
    toy = Path(cfg.clip_pretrained)
    if _is_path(cfg.clip_pretrained) and cfg.demo_model == "toy":  # the planted model needs no pre-training
        cached = toy == toy_clip_path(cfg)  # ours, under --cache-dir: validated, rebuilt when corrupt
        clean_stale_temps(toy.parent)
        if (load_cache(toy, read_toy_clip) is None) if cached else not toy.is_file():
            print0(f"demo: pre-training the toy CLIP ({cfg.toy_steps} steps; cached for next time)")
            pretrain_toy(cfg, cfg.clip_pretrained)


def demo_baselines(cfg: Config, val_set: SegDataset, device) -> dict:
    """Reference points for the demo table: pseudo-labels (after PAR) of a random-weight toy CLIP, and
    background everywhere. The random CLIP runs without DiCLIP's cache (a cache built from its flat maps holds
    nothing: under the demo's contrast floor no cache image even gets a pseudo mask)."""
    rnd_cfg = dataclasses.replace(cfg, clip_pretrained="random", demo_model="toy", tsa="off", save_vis="")
    rnd = Frozen(rnd_cfg, device, need_dino=False)
    res = evaluate(None, rnd, val_set, rnd_cfg, device, cams=True)
    K = len(dataset_info(cfg)["classes"])
    conf = torch.zeros(K, K, dtype=torch.long, device=device)
    for i in shard(min(len(val_set), cfg.max_images or len(val_set))):
        gt = val_set[i]["mask"].to(device)
        conf += confusion_matrix(torch.zeros_like(gt), gt, K)
    return {"random CLIP": res["refined+PAR"], "all-bg": miou(all_reduce_sum(conf))}


# ----------------------------------------------------------------------------------------------------
# II.13 Benchmark: per-stage time of one training step against the frozen encoders' forward pass
# ----------------------------------------------------------------------------------------------------

BENCH_ONE_RUN_S = 5.0  # a stage whose warm-up run takes longer is reported by that run (DiCLIP's SD stages on a CPU)


class HookTimer:
    """Wall time of each call of `module` (forward pre/post hooks; CUDA synchronised) while inside `with`: .calls
    (seconds)."""

    def __init__(self, module, device):
        self.module, self.calls, self._start = module, [], None
        self.sync = torch.cuda.synchronize if torch.device(device).type == "cuda" else lambda: None

    def _now(self):
        self.sync()
        return time.perf_counter()

    def __enter__(self):
        self._hooks = [self.module.register_forward_pre_hook(lambda *a: setattr(self, "_start", self._now())),
                       self.module.register_forward_hook(lambda *a: self.calls.append(self._now() - self._start))]
        return self

    def __exit__(self, *exc):
        for h in self._hooks:
            h.remove()


def bench_tsa_cache(frozen, cfg: Config) -> tuple:
    """The TSA cache DiCLIP's step is timed with (bench never builds one): the built cache of these settings if
    there is one, else a STAND-IN of the real sizes that costs nothing to make: C x cache_per_class foreground and
    cache_bg background random unit keys of width E (seeded), with values as build_kv_cache makes them (a foreground
    key: one-hot at its class x cos(key, class text); a background key: e_0). Retrieval and the adapter cost the
    same for any keys of these shapes. -> (dict(keys (Nk, E), values (Nk, C+1)) on frozen.device, a line saying
    which cache it is)."""
    path = tsa_cache_path(cfg)
    cache = load_tsa_cache(path, tsa_settings(cfg))
    if cache is not None:
        note = f"the built cache {path} ({len(cache['keys'])} keys)"
    else:
        C, E = frozen.num_fg, frozen.texts.shape[1]
        g = torch.Generator().manual_seed(cfg.seed)
        fg = {c: torch.randn(cfg.cache_per_class, E, generator=g) for c in range(1, C + 1)}
        bg = torch.randn(cfg.cache_bg, E, generator=g)
        # as many features as keys: build_kv_cache keeps them as the keys (no K-means)
        cache = build_kv_cache(fg, bg, frozen.cam_texts[:C], cfg.cache_per_class, cfg.cache_bg, log=lambda *a: None)
        note = (f"stand-in cache (random keys of the real sizes): {C} classes x {cfg.cache_per_class} + "
                f"{cfg.cache_bg} background = {len(cache['keys'])} keys; none built for these settings (`cache` "
                f"builds it)")
    tsa = dict(keys=cache["keys"].float().to(frozen.device), values=cache["values"].float().to(frozen.device))
    return tsa, note


def bench_offline_phase(frozen, cfg: Config, sd, timed, show, steps: int = 2) -> dict:
    """DiCLIP's offline phase (the TSA cache build) per image, to estimate the build on this hardware. Generation:
    one image by the real path (sd_image_maker) with `steps` of its cache_steps sampler steps, the UNet calls timed
    by hooks; one image ~ fixed part (prompt encoding, VAE decode: the rest of the call) + cache_steps x one step
    (an estimate from one run). Pseudo mask + pooled features of that image at crop_size (tsa_label_fns,
    pool_cache_features, batch 1). The whole build ~ images x (both); K-means and file IO not included. Each row
    is shown (show(name, seconds)) as it is measured. -> dict(rows {name: seconds}, images, total seconds)."""
    from PIL import Image
    name = DATASETS[cfg.dataset]["classes"][1]
    rows = {}
    if cfg.cache_source == "sd":
        k = min(steps, cfg.cache_steps)
        make = sd_image_maker(sd, cfg, steps=k)
        with HookTimer(sd.unet, sd.device) as timer:  # one run: a real image's k steps take a while on a CPU
            t = time.perf_counter()
            rgb = make(1, name, 1000)
            total = time.perf_counter() - t
        unet = timer.calls
        step, S = sum(unet) / k, cfg.cache_image_size
        cfg_note = "2 latents: CFG" if cfg.cache_guidance > 1 else "1 latent"
        rows[f"SD generation, one DDIM step (UNet on {cfg_note})"] = step
        rows[f"SD generation, the rest (prompt, VAE decode at {S}x{S})"] = total - sum(unet)
        image = rows[f"SD generation, one image of {cfg.cache_steps} steps (estimate)"] = \
            total - sum(unet) + cfg.cache_steps * step
    else:  # the synthetic world's stand-in renderer
        make = synthetic_image_maker(cfg.cache_image_size)
        rgb = make(1, name, 1000)
        image = rows["synthetic renderer: one image (stand-in for SD)"] = timed(lambda: make(1, name, 1000))
    for row, t in rows.items():
        show(row, t)
    s = cfg.crop_size
    crop = normalize_image(np.asarray(Image.fromarray(rgb).resize((s, s), Image.BILINEAR)), cfg.norm)
    crop, cls = crop[None].to(frozen.device), torch.tensor([1], device=frozen.device)
    feature_fn, pseudo_mask_fn = tsa_label_fns(frozen, cfg)
    row = f"pseudo mask + pooled features, one image at {s}x{s}"
    mask = rows[row] = timed(lambda: pool_cache_features(crop, cls, feature_fn, pseudo_mask_fn))
    show(row, mask)
    n = cfg.cache_images_per_class * frozen.num_fg
    return dict(rows=rows, images=n, total=n * (image + mask))


def bench(cfg: Config) -> dict:
    """Time each stage of a training step on random images of crop_size (the current device, batch_size
    images, 2 classes each), and the peak memory. ratio = whole step / frozen encoders' forward pass. DiCLIP: the
    step runs with the built TSA cache of these settings or a stand-in of its sizes (bench_tsa_cache; nothing is
    generated), and its offline phase is timed per image (bench_offline_phase) to estimate the cache build."""
    device = get_device(cfg)
    if cfg.demo:
        prepare_demo(cfg)  # the toy route's CLIP is pre-trained on first use
    frozen = Frozen(cfg, device, tsa_cache=False)  # loads only what the step uses: DiCLIP's cache is supplied here
    cache_note = None
    if cfg.tsa != "off":
        frozen.tsa, cache_note = bench_tsa_cache(frozen, cfg)
    decoder = build_decoder(cfg, frozen).to(device)
    optimizer = torch.optim.AdamW(decoder.parameters(), lr=cfg.lr)
    g = torch.Generator().manual_seed(cfg.seed)
    B, s = cfg.batch_size, cfg.crop_size
    images = torch.randn(B, 3, s, s, generator=g).to(device)
    labels = torch.zeros(B, frozen.num_fg, device=device)
    for b in range(B):
        labels[b, torch.randperm(frozen.num_fg, generator=g)[:2]] = 1

    def run(fn):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - t

    def timed(fn):  # the median of bench_repeats runs after a warm-up; a slow stage: its warm-up run
        first = run(fn)
        return first if first > BENCH_ONE_RUN_S else float(np.median([run(fn) for _ in range(cfg.bench_repeats)]))

    def frozen_forward():  # the plain forward of all L blocks at this size (no attention maps, no gradients)
        with torch.no_grad():
            x_last = clip_image_forward(frozen.clip, images)["x_last"]
            y, _ = run_block(frozen.clip.visual.transformer.resblocks[-1], x_last, need_attn=False)
            frozen.clip.visual.ln_post(y[:, 1:]).mean(1) @ frozen.clip.visual.proj
            if frozen.dino is not None:
                dino_features(frozen.dino, images, cfg.norm)
            if frozen.sd is not None and cfg.vce:  # DiCLIP's frozen pass includes SD's UNet pass
                sd_self_attention(frozen.sd, images, cfg, (s // frozen.patch, s // frozen.patch))

    n_attn = attn_blocks_needed(cfg, frozen.num_blocks)
    grid = (s // frozen.patch, s // frozen.patch)
    if cfg.vce:  # DiCLIP: SD attention -> ACR (vce_attention's two steps, kept apart to time them)
        a_sd = sd_self_attention(frozen.sd, images, cfg, grid)
        acr = lambda: acr_refine(a_sd, cfg.acr_k, cfg.acr_delta, cfg.acr_rounds, cfg.acr_variant,  # noqa: E731
                                 cfg.acr_iters, seed=0) if cfg.acr_rounds else a_sd
    a_acr = acr() if cfg.vce else None
    calib = calib_spec(cfg, a_acr)
    out = clip_image_forward(frozen.clip, images, n_attn, calib=calib)
    rows = cam_rows(labels, frozen, with_super=cfg.lambda_b > 0)
    c = ~rows["is_super"]
    if cfg.cam == "gradcam":
        cams, attn_last, patch_emb = gradcam(frozen, out, rows)
        attn_all = attn_last[:, None] if out["attn"] is None else torch.cat([out["attn"], attn_last[:, None]], 1)
    else:  # ExCEL / DiCLIP: the patch-text CAM, static and with a bias like LVC's (the dynamic CAM)
        (h, w), N = out["grid"], out["grid"][0] * out["grid"][1]
        bias = lvc_bias(lvc_relation(torch.randn(B, N, cfg.dec_dim, generator=g).to(device)))

        def text_cam(bias=None):
            tokens = calibrated_tokens(frozen.clip.visual, out, bias, 1.0, cfg.svc_norm)
            cam_all = patch_text_cam(tokens, frozen.cam_texts, frozen.num_fg, cfg.cam_sim)
            return cam_all[rows["img"], :, rows["cls"] - 1].view(-1, h, w), tokens

        cams, tokens = text_cam()
        patch_emb = F.normalize(tokens[:, 1:], dim=-1)
        attn_all = caa_maps(out, cfg)

    def refinement():
        A = propagation_matrix(frozen, attn_all, patch_emb, cfg, S=None)
        box = box_mask(cams[c], cfg.box_threshold) if cfg.refine.endswith(("caa", "rfm")) else None
        return refine_cams(cams[c], rows["img"][c], A, box)

    refined = refinement()

    def decoder_fwd_bwd():  # DiCLIP: head_outputs runs the TSA adapter beside the decoder
        logits, S, _, Z = head_outputs(decoder, out, frozen, cfg)
        loss = balanced_ce_loss(logits, torch.zeros(B, s, s, dtype=torch.long, device=device)) + S.mean()
        (loss if Z is None else loss + Z.float().mean()).backward()

    step_at = cfg.rfm_dynamic_after if cfg.cam == "text" else 0  # ExCEL, DiCLIP: the (costlier) dynamic phase

    def step():
        loss, _, _ = compute_losses(decoder, frozen, images, labels, cfg, step=step_at)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    extra = " + DINOv2" if frozen.dino is not None else " + SD UNet pass" if cfg.vce else ""
    stages = {f"frozen forward (CLIP{extra})": frozen_forward}
    sub_rows = {}  # a stage's parts, measured by hooks while it is timed: {stage: {row: () -> seconds}}
    if cfg.cam == "gradcam":
        stages.update({
            f"CLIP blocks 1..L-1, {n_attn} attention maps": lambda: clip_image_forward(frozen.clip, images, n_attn),
            f"GradCAM, {int(rows['img'].numel())} rows in one pass": lambda: gradcam(frozen, out, rows),
            "  (for reference: one pass per row, as upstream)": lambda: [
                gradcam(frozen, dict(out, x_last=out["x_last"][int(rows["img"][r]):int(rows["img"][r]) + 1]),
                        dict({k: v[r:r + 1] for k, v in rows.items()}, img=rows["img"][:1] * 0))
                for r in range(len(rows["img"]))]})
    else:
        if cfg.vce:
            vae, unet = HookTimer(frozen.sd.vae.encoder, device), HookTimer(frozen.sd.unet, device)

            def sd_pass():
                with vae, unet:
                    sd_self_attention(frozen.sd, images, cfg, grid)

            sd_row = f"SD VAE encode + UNet pass at {cfg.sd_size} (attention capture)"
            stages[sd_row] = sd_pass
            part = lambda t: float(np.median(t.calls[1:] or t.calls))  # noqa: E731  (as timed: no warm-up)
            sub_rows[sd_row] = {"  of which VAE encoder": lambda: part(vae),
                                "  of which UNet with the capture": lambda: part(unet)}
            stages[f"ACR (KL k-means K={cfg.acr_k}, T={cfg.acr_rounds})"] = acr
        dual = f"CLIP dual path with VCE ({out['n_calib']} calibrated blocks, {n_attn} attn maps)" if cfg.vce \
            else f"CLIP dual path: {out['n_calib']} calibrated blocks, {n_attn} attention maps"
        stages[dual] = lambda: clip_image_forward(frozen.clip, images, n_attn, calib=calib)
        if cfg.tse != "off" and getattr(frozen, "attr_centroids", None) is not None:
            fg = frozen.texts[: frozen.num_fg]
            stages["TSE retrieval (once, at start-up)"] = \
                lambda: tse_text_embeddings(fg, frozen.attr_centroids, cfg.tse_keep, cfg.tse_lambda)
        stages["patch-text CAM, static"] = text_cam
        if cfg.lvc:
            stages["patch-text CAM, dynamic (LVC bias)"] = lambda: text_cam(bias)
        if cfg.tsa != "off":
            feats_c = cache_features(calibrated_tokens(frozen.clip.visual, out, None, 1.0, cfg.svc_norm))
            m_p = cams.new_zeros(B, N, frozen.num_fg)
            stages[f"TSA static retrieval ({len(frozen.tsa['keys'])} keys) + M_st"] = lambda: static_cache_fusion(
                m_p, static_cache_cam(feats_c, frozen.tsa["keys"], frozen.tsa["values"], cfg.cache_beta),
                cfg.cache_alpha, cfg.cache_negative)
        if decoder.cache_adapter is not None:
            def adapter():  # Z, M_dt (label path), L_dyn on the upsampled Z, backward
                Z = decoder.cache_adapter(feats_c)
                dynamic_cam(m_p, Z, cfg.cache_alpha, cfg.cache_dyn_softmax)
                z = F.interpolate(Z.transpose(1, 2).reshape(B, -1, h, w), size=(s, s), mode="bilinear",
                                  align_corners=False)
                F.cross_entropy(z, torch.zeros(B, s, s, dtype=torch.long, device=device)).backward()

            nk = decoder.cache_adapter.w1.out_features - cfg.cache_prompts
            stages[f"TSA adapter ({nk} keys + {cfg.cache_prompts} prompts): Z, M_dt, L_dyn"] = adapter
    stages[f"{'CAA ' if cfg.cam == 'text' else ''}refinement ({cfg.refine})"] = refinement
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
    if decoder.cache_adapter is not None:  # DiCLIP's dynamic phase: Y_st beside Y (the same shapes)
        groups.append(groups[0])
    second = " and Y_s" if frozen.dino is not None else " and Y_st" if decoder.cache_adapter is not None else ""
    stages[f"PAR + label assembly (Y{second})"] = lambda: cams_to_labels(groups, images, cfg)
    stages["decoder forward + backward" if cfg.cam == "gradcam" else "decoder + TSA adapter forward + backward"
           if decoder.cache_adapter is not None else "adapter + decoder forward + backward"] = decoder_fwd_bwd
    stages["whole training step"] = step
    print(f"bench: method {cfg.method} | refine {cfg.refine} | CLIP {clip_description(cfg)} "
          f"| batch {B} x {s}x{s} | device {device} | threads {torch.get_num_threads()}")
    print(f"  (each stage: the median of {cfg.bench_repeats} run{'s' * (cfg.bench_repeats > 1)} after a warm-up; a "
          f"stage whose warm-up takes over {BENCH_ONE_RUN_S:g} s: that one run)")
    if cache_note:
        print(f"  TSA cache: {cache_note}")
    show = lambda name, t: print(f"  {name:<58} {1000 * t:9.1f} ms", flush=True)  # noqa: E731
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times = {}
    for name, fn in stages.items():  # printed as they come: DiCLIP's SD stages take a while on a CPU
        times[name] = timed(fn)
        show(name, times[name])
        for sub, get in sub_rows.get(name, {}).items():
            times[sub] = get()
            show(sub, times[sub])
    ref = times[next(iter(stages))]
    ratio = times["whole training step"] / ref  # the reference line is not part of the step
    cda_400 = None
    if True:  # CD-CLIP's CDA at the paper's VOC size: 400 patches x 25 texts, one image
        p = torch.rand(1, 400, 25, generator=g).softmax(-1).to(device)
        a = torch.rand(1, 400, 400, generator=g).to(device)
        cda_400 = timed(lambda: cda_affinity(p, a, cfg.cda_tau))
    show("CDA, 400 patches x 25 texts, one image", cda_400)
    if device.type == "cuda":
        peak = f"{torch.cuda.max_memory_allocated() / 2**20:.0f} MiB (CUDA)"
    else:
        import resource
        peak = f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB (process RSS)"
    print(f"  peak memory {peak}")
    print(f"  ratio: training step / frozen forward = {ratio:.2f} (target <= 1.5)", flush=True)
    offline = None
    if cfg.tsa != "off":  # DiCLIP's offline phase per image (SD for the generation even under --no-vce)
        sd = frozen.sd if frozen.sd is not None or cfg.cache_source != "sd" else build_sd(cfg, device)
        k = min(2, cfg.cache_steps)
        timed_steps = f", {k} of {cfg.cache_steps} sampler steps timed" if cfg.cache_source == "sd" else ""
        print(f"offline phase per cache image (the TSA cache build of `wsss.py cache`{timed_steps}):", flush=True)
        offline = bench_offline_phase(frozen, cfg, sd, timed, show, steps=k)
        print(f"  whole cache: {frozen.num_fg} classes x {cfg.cache_images_per_class} images = {offline['images']} "
              f"images, about {offline['total'] / 3600:.2f} h here\n"
              f"  (estimate: images x (one image + its pseudo mask); K-means and file IO not included)")
    return dict(times=times, ratio=ratio, cda_400=cda_400, peak=peak, cache=cache_note, offline=offline)


# ----------------------------------------------------------------------------------------------------
# II.14 Commands: train | eval | cams | cache | compare | synth | pretrain-toy | bench  ->  main(argv)
# ----------------------------------------------------------------------------------------------------

USAGE = """Run (CPU is fine for the demo; a CUDA GPU is used automatically when present):
  python wsss.py train --method cdclip --demo          # synthetic world, planted CLIP, ~2 min on 2 CPU cores
  python wsss.py eval  --ckpt runs/cdclip-synthetic-demo/ckpt.pt   # ... its checkpoint (settings from the file)
  python wsss.py train --method cdclip --data-root VOCdevkit/VOC2012   # real VOC, real checkpoints (GPU)
  python wsss.py eval  --ckpt runs/cdclip-voc/ckpt.pt [--crf] [--save-vis DIR]   # mIoU of the trained decoder
  python wsss.py cams  --method cdclip --data-root ... --refine cda   # training-free pseudo-label mIoU
  python wsss.py cams  --method cdclip --data-root ... --save-pseudo DIR  # ... and write them as PNGs
  python wsss.py predict --ckpt runs/cdclip-voc/ckpt.pt --images photos/ --out masks/  # segment new images
  python wsss.py train --method cdclip --dataset custom --data-root mydata/  # your own images and tags (data.md)
  python wsss.py cache --method diclip --data-root ... # build DiCLIP's TSA key-value cache (resumable)
  python wsss.py compare --demo                        # the four methods on the same data, one table
  python wsss.py compare --demo --demo-model planted   # the same with a hand-set CLIP whose attention is semantic
  python wsss.py synth --data-root /tmp/synth          # write the synthetic dataset in the VOC layout
  python wsss.py synth --data-root /tmp/mine --layout custom  # ... in the your-own-data layout (no train masks)
  python wsss.py pretrain-toy                          # contrastively pre-train the toy CLIP used by --demo
  python wsss.py bench --method cdclip --clip-pretrained random --dino-model random  # timings of a step
  torchrun --nproc_per_node=4 wsss.py train ...        # DDP (nccl on GPU, gloo on CPU)
  pytest test_wsss.py                                  # the test-suite (CPU, tiny models)"""

# What each command does (`wsss.py --help`, and the first line of `wsss.py COMMAND --help`).
COMMAND_HELP = {
    "train": "Train the decoder on a method's pseudo-labels; the run folder gets config.json, metrics.jsonl and "
             "checkpoints.",
    "eval": "Score a trained checkpoint's decoder on the val split (mIoU table). Its settings (method, data, model, "
            "demo) come from the checkpoint; a flag given overrides one.",
    "cams": "Score a method's pseudo-labels (raw CAM, refined, +PAR), training-free; with --ckpt, the trained "
            "model takes part and the settings come from the checkpoint.",
    "predict": "Segment new images with a checkpoint (index PNGs at the images' size; no masks needed).",
    "cache": "Build DiCLIP's TSA key-value cache (resumable; a re-run with the same settings does no work).",
    "compare": "Train several methods on the same data, seed and schedule, each by `train` with these flags; one "
               "table.",
    "synth": "Write the synthetic dataset (the demo's world) in the VOC layout, or your-own-data layout.",
    "pretrain-toy": "Pre-train the toy CLIP that --demo uses (cached under --cache-dir).",
    "bench": "Time each stage of one training step against the frozen encoders' forward pass.",
}


def cmd_train(cfg: Config):
    train(cfg)


def cmd_eval(cfg: Config):
    """Checkpoint -> mIoU table of the decoder on val_split (multi-scale + flip, optional CRF, overlays). The
    settings are the checkpoint's (checkpoint_config), so `eval --ckpt PATH` alone evaluates any run."""
    # the run's settings from the checkpoint, the flags given on top; the label path's input files only for the
    # overlays of --save-vis (they draw the pseudo-label); check_checkpoint refuses a given flag that changes the
    # model's shape, and data of other classes
    ckpt, cfg = checkpoint_config(cfg.ckpt, cfg, label_path=bool(cfg.save_vis), reads_data=True)
    device = setup_distributed(cfg)  # under torchrun the images are sharded and the counts summed
    check_checkpoint(ckpt, cfg.ckpt, cfg)
    dataset = SegDataset(cfg, cfg.val_split, train=False)
    if not dataset.masks:
        raise WSSSError(f"the {cfg.val_split} split has no masks to score against; `wsss.py predict --ckpt "
                        f"{cfg.ckpt} --images DIR --out DIR` segments images without them")
    # test time is CLIP + the decoder alone (no DINOv2, SD, attribute bank or DiCLIP cache); the overlays of
    # --save-vis draw the pseudo-label too, which needs the method's label path
    frozen = Frozen(cfg, device, need_dino=False, label_path=bool(cfg.save_vis))
    decoder = build_decoder(cfg, frozen).to(device)
    state = ckpt["decoder"] if decoder.cache_adapter is not None else \
        {k: v for k, v in ckpt["decoder"].items() if not k.startswith("cache_adapter.")}  # a training-time module
    decoder.load_state_dict(state)
    res = evaluate(decoder, frozen, dataset, cfg, device)
    title = (f"{cfg.ckpt} (step {ckpt['step']}) on {cfg.dataset} {cfg.val_split}, scales {cfg.eval_scales}, "
             f"flip {cfg.eval_flip}, crf {cfg.crf}")
    print0(format_table(res, dataset_info(cfg)["classes"], title=title))
    print0(table_legend(res, cfg, steps=ckpt.get("step")))
    if cfg.save_vis:
        print0(f"overlays (image | CAM | pseudo-label | prediction | truth): {cfg.save_vis}/")
    return res


def cmd_cams(cfg: Config):
    """Pseudo-label quality on cam_split: raw CAM, after --refine, after PAR. Training-free by default (ExCEL's
    and DiCLIP's training-free results); with an explicit --ckpt, the settings are the checkpoint's and the trained
    model's affinity takes part (ExCEL's dynamic CAM and sigmoid(R)-gated CAA, WeCLIP's dynamic RFM)."""
    trained = "ckpt" in getattr(cfg, "_given", ())
    if trained:  # the run's settings, the flags given on top; the label path with its input files
        ckpt, cfg = checkpoint_config(cfg.ckpt, cfg, label_path=True, reads_data=True)
    device = setup_distributed(cfg)
    if cfg.demo:
        prepare_demo(cfg)
    dataset = SegDataset(cfg, cfg.cam_split, train=False)
    if not dataset.masks and not cfg.save_pseudo:
        raise WSSSError(f"the {cfg.cam_split} split has no masks to score the pseudo-labels against: pass "
                        f"--save-pseudo DIR to write them")
    frozen = Frozen(cfg, device, need_dino=False)
    decoder, mode = None, "training-free"
    if trained:
        check_checkpoint(ckpt, cfg.ckpt, cfg)
        decoder = build_decoder(cfg, frozen).to(device)
        decoder.load_state_dict(ckpt["decoder"])
        decoder.eval()
        cfg = dataclasses.replace(cfg, val_box_threshold=0.0)  # infer_lam keeps the training threshold
        mode = f"with {cfg.ckpt} (step {ckpt['step']})"
    res = evaluate(None, frozen, dataset, cfg, device, cams=True, label_decoder=decoder)
    if cfg.save_pseudo:
        print0(f"pseudo-labels of {min(len(dataset), cfg.max_images or len(dataset))} {cfg.cam_split} images "
               f"(refined + PAR, index PNGs, VOC palette) -> {cfg.save_pseudo}/")
    if cfg.save_vis:  # no decoder here: no prediction panel
        print0(f"overlays (image | CAM | pseudo-label{' | truth' if dataset.masks else ''}): {cfg.save_vis}/")
    if not dataset.masks:
        return res
    print0(format_table(res, dataset_info(cfg)["classes"], title=f"pseudo-labels of {cfg.method} "
                        f"(cam {cfg.cam}, refine {cfg.refine}, {mode}) on {cfg.dataset} {cfg.cam_split}"))
    print0(table_legend(res, cfg))
    return res


# Settings of one invocation, not of the run: a checkpoint's values of these are not taken over (its --max-images
# limited the run's validation, its device was that machine's), so they are the flag given or the default.
INVOCATION_FIELDS = ("device", "num_workers", "max_images", "save_vis", "num_vis", "save_pseudo", "cam_split", "images",
                     "out", "resume", "overwrite", "eval_cams", "bench_repeats", "compare_methods")


def checkpoint_config(path, cfg: Config, label_path: bool = False, reads_data: bool = False):
    """The settings of a trained run: the checkpoint's saved config (method, dataset, data root, model, demo, test
    protocol; not INVOCATION_FIELDS), under the flags given on the command line (cfg._given). Without `label_path`
    (test time is CLIP + the decoder: eval, predict) the label path's input files are dropped, so a bank or a labels
    file left on the training machine is not needed. With `reads_data` (eval, cams) a custom dataset's class table is
    read from its --data-root (load_checkpoint compares it with the checkpoint's); predict reads no data and uses the
    checkpoint's table. An explicit --method other than the checkpoint's is refused. -> (ckpt, Config)."""
    ckpt = read_checkpoint(path, " (pass --ckpt runs/<method>-<dataset>/ckpt.pt)")
    if "config" not in ckpt:
        raise WSSSError(f"{path} is not a wsss.py checkpoint (it has no config)")
    saved, names, given = ckpt["config"], {f.name for f in fields(Config)}, getattr(cfg, "_given", frozenset())
    if "method" in given and saved.get("method") not in (None, cfg.method):
        raise WSSSError(f"checkpoint {path} was trained with --method {saved['method']}, not {cfg.method}: drop "
                        f"--method (the settings come from the checkpoint)")
    values = {k: v for k, v in saved.items() if k in names and k not in INVOCATION_FIELDS}
    if not label_path:
        values.update(tse="off", attr_bank="", descriptions="", labels_file="")
    values.update({k: getattr(cfg, k) for k in given if k in names})
    values.update(ckpt=str(path), resume="")
    if values.get("dataset") == "custom" and not reads_data:
        root = values.get("data_root", "")
        if "info" in ckpt:
            register_dataset_info(root, ckpt["info"])
        elif not (Path(root) / "classes.txt").is_file():
            raise WSSSError(f"{path} has no class table (written before custom datasets) and its data root "
                            f"{root or '(none)'} has no classes.txt: pass --data-root DIR, the folder it was "
                            f"trained on")
    cfg = make_config(**values)
    cfg._given = given
    return ckpt, cfg


def image_files(spec: str) -> tuple:
    """The images `predict` reads: one file, a folder (recursively) or a glob. -> (image paths sorted, number of
    other files skipped); no image at all is one line."""
    import glob
    p = Path(spec).expanduser()
    files = [p] if p.is_file() else sorted(q for q in p.rglob("*") if q.is_file()) if p.is_dir() else \
        sorted(Path(q) for q in glob.glob(str(p), recursive=True) if Path(q).is_file())
    images = [f for f in files if f.suffix.lower() in IMAGE_SUFFIXES]
    if not images:
        raise WSSSError(f"--images {spec}: no image files found ({len(files)} other files; image types: "
                        f"{' '.join(IMAGE_SUFFIXES)})")
    return images, len(files) - len(images)


def cmd_predict(cfg: Config):
    """Segment new images with a trained checkpoint, no ground truth needed: one index PNG per image (class ids,
    VOC palette, the image's own size) under --out, named after the image (sub-folders kept); --save-vis also
    writes a readable overlay (image | prediction, titles, legend) per image. Multi-scale + flip and --crf as
    `eval`. Files that are not images (by suffix) or cannot be read are skipped with a count."""
    if not cfg.images or not cfg.out:
        raise WSSSError("predict needs --ckpt CKPT --images DIR|FILE|GLOB --out DIR")
    ckpt, cfg = checkpoint_config(cfg.ckpt, cfg)
    check_finite_state(ckpt["decoder"], cfg.ckpt)
    files, other = image_files(cfg.images)
    out_dir = make_dir(cfg.out, "--out")
    vis_dir = make_dir(cfg.save_vis, "--save-vis") if cfg.save_vis else None
    device = get_device(cfg)
    frozen = Frozen(cfg, device, need_dino=False, label_path=False)  # test time: CLIP + the decoder
    decoder = build_decoder(cfg, frozen).to(device)
    decoder.load_state_dict({k: v for k, v in ckpt["decoder"].items() if not k.startswith("cache_adapter.")})
    decoder.eval()
    base = Path(cfg.images).expanduser()
    base = base if base.is_dir() else None
    done, bad, used = 0, [], set()
    for f in _progress(files):
        try:
            rgb = load_rgb(f)
        except WSSSError as e:
            bad.append(str(e))
            continue
        rel = f.relative_to(base) if base is not None else Path(f.name)
        name = rel.with_suffix("") if rel.with_suffix("") not in used else rel  # a.jpg and a.png: a.png.png
        used.add(name)
        image = normalize_image(rgb, cfg.norm)[None].to(device)
        with torch.no_grad():
            logits = predict_logits(decoder, frozen, image, cfg)
        pred = crf_refine(rgb, logits[0].softmax(0).cpu().numpy(), cfg) if cfg.crf else \
            logits[0].argmax(0).cpu().numpy()
        save_label_png(pred, out_dir / f"{name}.png")
        if vis_dir is not None:  # the overlays' style of `eval`, the two panels predict has
            save_overlay(make_dir(vis_dir / name.parent, "--save-vis") / f"{name.name}.png", rgb, None, None,
                         pred, None, cfg=cfg)
        done += 1
    skipped = f"; skipped {other} non-image file(s)" if other else ""
    skipped += f"; skipped {len(bad)} unreadable image(s), first: {bad[0]}" if bad else ""
    classes = ", ".join(f"{k} {n}" for k, n in enumerate(dataset_info(cfg)["classes"][:8]))
    print0(f"predicted {done} image(s) with {cfg.method} (step {ckpt.get('step')}) -> {out_dir}/ (index PNGs: "
           f"{classes}{', ...' if len(dataset_info(cfg)['classes']) > 8 else ''}){skipped}")
    if vis_dir is not None and done:
        print0(f"overlays (image | prediction): {vis_dir}/")
    if not done:
        raise WSSSError(f"no image of --images {cfg.images} could be read ({bad[0] if bad else ''})")
    return done


def cmd_synth(cfg: Config):
    if not cfg.data_root:
        raise WSSSError("synth needs --data-root DIR (the folder to write)")
    root = make_synthetic_dataset(make_dir(cfg.data_root, "--data-root"), cfg.num_images, cfg.image_size, cfg.seed,
                                  cfg.layout)
    print0(f"wrote {cfg.num_images} train + {max(1, cfg.num_images // 4)} val synthetic images to {root} "
           f"(use --dataset {'custom' if cfg.layout == 'custom' else 'synthetic'} --data-root {root})")


def cmd_pretrain_toy(cfg: Config):
    path = cfg.clip_pretrained if _is_path(cfg.clip_pretrained) else toy_clip_path(cfg)
    return pretrain_toy(cfg, path)


def cmd_cache(cfg: Config):
    """DiCLIP's TSA cache: generate the single-class images (resumable), pseudo-mask them with the method's own
    label path, pool, cluster, write {K, V} with a manifest. A re-run with the same settings does no work."""
    if cfg.tsa == "off":
        raise WSSSError("`cache` builds DiCLIP's TSA key-value cache: use --method diclip (or --tsa static|dynamic)")
    device = get_device(cfg)
    if cfg.demo:
        prepare_demo(cfg)
    frozen = Frozen(cfg, device, need_dino=False)
    m = frozen.tsa["manifest"]
    print0(f"TSA cache ready: {m['num_keys']} keys from {sum(m['images_per_class'].values())} images "
           f"({m['skipped']} skipped) -> {tsa_cache_path(cfg)}")
    return frozen.tsa


def cmd_compare(cfg: Config, argv=()):
    """One table for all four methods on the same data, seed and schedule: each method trains in its own process
    (`train` with the same flags, so each keeps its preset and its memory is its own) and the table gathers,
    per method, the pseudo-label mIoU (raw CAM, refined, +PAR) and the decoder's mIoU on val_split, the mean time
    per training step and the peak memory (the process's max RSS, or CUDA's peak)."""
    import subprocess
    methods = [m.strip() for m in cfg.compare_methods.split(",") if m.strip()]
    if not methods:
        raise WSSSError(f"--compare-methods names no method; give a comma list of {', '.join(METHODS)}")
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise WSSSError(f"--compare-methods has unknown methods {unknown}; choose from {', '.join(METHODS)}")
    flags, skip = [], False  # the user's flags minus the ones compare sets per method (same seed and schedule)
    for a in argv:
        if skip:
            skip = False
            continue
        if a.split("=")[0] in ("--method", "--out-dir", "--compare-methods", "--seed", "--max-steps"):
            skip = "=" not in a
            continue
        flags.append(a)
    base = Path(cfg.out_dir).parent / "compare" if "out_dir" not in getattr(cfg, "_given", ()) else Path(cfg.out_dir)
    rows, failed = {}, {}
    for m in methods:
        out = base / m
        args = ["train", "--method", m, "--out-dir", str(out), "--eval-cams", "--seed", str(cfg.seed),
                "--max-steps", str(cfg.max_steps), *flags]
        done = out / "compare.json"  # written when the method's run finished: its command and its costs
        try:
            before = json.loads(done.read_text(encoding="utf-8")) if done.is_file() else None
        except (OSError, ValueError):
            before = None
        if isinstance(before, dict) and before.get("args") == args and (out / "metrics.jsonl").is_file():
            print0(f"compare: {m} finished before with the same settings ({out}): reusing its results")
            rows[m] = dict(_final_val(out), **before["cost"])
            continue
        print0(f"compare: {m} ...")
        t0 = time.time()
        proc = subprocess.Popen([sys.executable, str(Path(__file__).resolve()), *args], stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE, text=True)
        err = proc.stderr.read()
        _, status, usage = os.wait4(proc.pid, 0)
        code = os.waitstatus_to_exitcode(status)
        if code != 0:
            why = f"killed by {signal.Signals(-code).name}" if code < 0 else \
                re.sub(r"^error: ", "", _one_line(Exception(err))) if err.strip() else f"exit status {code}, no message"
            failed[m] = why
            print0(f"compare: {m} failed: {why}")
            continue
        lines = [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines() if ln.strip()]
        ms = [ln["ms_per_step"] for ln in lines if "ms_per_step" in ln]
        cost = dict(ms=float(np.mean(ms)) if ms else float("nan"), peak=usage.ru_maxrss / 1024, wall=time.time() - t0)
        atomic_write_text(json.dumps(dict(args=args, cost=cost)), done)
        rows[m] = dict(_final_val(out), **cost)
        print0(f"compare: {m} done in {cost['wall']:.0f} s")
    cols = ("cam", "refined", "refined+PAR", "decoder", "oracle+PAR")
    lines = [f"{'method':<8}" + "".join(f"{c:>12}" for c in cols) + f"{'ms/step':>10}{'peak MiB':>10}{'wall s':>8}"]
    for m in methods:
        r = rows.get(m)
        lines.append(f"{m:<8}" + (f"  failed: {failed[m]}" if r is None else
                                  "".join(f"{100 * r[c]:12.1f}" if c in r else f"{'-':>12}" for c in cols)
                                  + f"{r['ms']:10.0f}{r['peak']:10.0f}{r['wall']:8.0f}"))
    print0(f"compare on {cfg.dataset} {cfg.val_split} (mIoU %; pseudo-labels from the image labels, decoder "
           f"multi-scale; same data, seed and schedule; oracle+PAR: the raw CAMs propagated by the perfect "
           f"affinity from the true masks, a diagnostic ceiling of the refinement):\n" + "\n".join(lines))
    if failed:  # after the table of what finished
        raise WSSSError(f"compare: {len(failed)} of {len(methods)} methods failed ({', '.join(failed)}); see above")
    return rows


def _final_val(out: Path) -> dict:
    """The final evaluation of a finished training run: the last "val" line of its metrics.jsonl."""
    vals = [json.loads(ln)["val"] for ln in (out / "metrics.jsonl").read_text().splitlines()
            if ln.strip() and '"val"' in ln]
    return vals[-1] if vals else {}


COMMANDS = {"train": cmd_train, "eval": cmd_eval, "cams": cmd_cams, "predict": cmd_predict, "cache": cmd_cache,
            "synth": cmd_synth, "pretrain-toy": cmd_pretrain_toy, "bench": bench, "compare": cmd_compare}


def _one_line(e: Exception) -> str:
    """The user-facing line of an error, also when a DataLoader worker wrapped it in a traceback."""
    lines = [ln for ln in str(e).strip().splitlines() if ln.strip()] or [type(e).__name__]
    return re.sub(r"^[\w.]*WSSSError: ", "", lines[-1].strip())


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        import textwrap
        pad = " " * (max(map(len, COMMANDS)) + 4)
        print("usage: wsss.py COMMAND [flags]   (wsss.py COMMAND --help lists its flags, grouped, with defaults)\n\n"
              "commands:\n" + "\n".join(textwrap.fill(COMMAND_HELP[c], 100, initial_indent=f"  {c:<{len(pad) - 4}}  ",
                                                         subsequent_indent=pad) for c in COMMANDS) + "\n\n" + USAGE)
        return 0
    command = argv.pop(0)
    rank, world, _ = dist_info()
    try:
        if command not in COMMANDS:
            raise WSSSError(_unknown_command(command, argv))
        cfg = parse_config(argv, command)
        COMMANDS[command](cfg, argv) if command == "compare" else COMMANDS[command](cfg)
    except RunInterrupted as e:  # Ctrl-C or SIGTERM in train: one line with the command that continues the run
        if rank == 0:
            print(_interrupted_line(e, argv), file=sys.stderr, flush=True)
        return 128 + int(e.signum)
    except KeyboardInterrupt:
        if rank == 0:
            print("interrupted", file=sys.stderr, flush=True)
        return 130
    except WSSSError as e:  # under torchrun every rank meets the same error: rank 0 reports it, unless it
        # happened on one rank only (agree marks it), then that rank does; PeerFailed ranks stay quiet
        if not isinstance(e, PeerFailed) and (rank == 0 or getattr(e, "rank_local", False)):
            print(f"error: {'[rank %d] ' % rank if world > 1 and rank else ''}{_one_line(e)}", file=sys.stderr,
                  flush=True)
        return 2
    return 0


def _unknown_command(command: str, argv) -> str:
    """The line for a command that is not one: a flag where the command goes, or a typo (difflib's closest)."""
    import difflib
    if command.startswith("-"):
        return (f"the command comes first: wsss.py COMMAND {shlex.join([command, *argv])} (commands: "
                f"{', '.join(COMMANDS)})")
    guess = difflib.get_close_matches(command.lower(), list(COMMANDS), n=1, cutoff=0.6)
    return f"unknown command {command!r}; " + (f"did you mean {guess[0]}?" if guess else
                                               f"choose one of {', '.join(COMMANDS)}")


def _interrupted_line(e: RunInterrupted, argv) -> str:
    """What main prints after Ctrl-C in `train`: where the run stands and the exact command that goes on: the
    same flags with --resume (--resume/--overwrite replaced), or, after the last step, `eval --ckpt` (eval takes
    every setting from the checkpoint)."""
    world = dist_info()[1]
    launcher = f"torchrun --nproc_per_node={world}" if world > 1 else "python"
    script = sys.argv[0] if sys.argv[0].endswith("wsss.py") else "wsss.py"
    args, skip = [], False
    for a in argv:
        name = a.split("=", 1)[0]
        if skip or name in ("--overwrite", "--no-overwrite"):
            skip = False
        elif name == "--resume":
            skip = "=" not in a
        else:
            args.append(a)
    if e.step is None:
        return f"{'terminated (SIGTERM)' if e.signum == signal.SIGTERM else 'interrupted'} before the first " \
               f"training step; nothing saved"
    what = "terminated (SIGTERM)" if e.signum == signal.SIGTERM else "interrupted"
    if e.finished:
        return (f"{what} after the last training step; the trained decoder (step {e.step}) is in {e.ckpt}; "
                f"evaluate it with: {launcher} {script} eval {shlex.join(['--ckpt', str(e.ckpt)])}")
    return (f"{what} at step {e.step}: checkpoint {e.ckpt}; continue with: {launcher} {script} train "
            f"{shlex.join(args + ['--resume', str(e.ckpt)])}")


if __name__ == "__main__":
    sys.exit(main())
