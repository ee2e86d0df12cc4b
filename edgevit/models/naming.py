"""Other repositories' key names for the models edgevit registers, mapped onto edgevit's own.

edgevit's ViT and Swin use timm's names, so timm state dicts load as they are; its EfficientViT
uses the official repository's (mit-han-lab/efficientvit). The seeds'
encoders were released under their own: OpenAI CLIP (`conv1`, `transformer.resblocks.N`,
`ln_post`, `proj`), BEiT (`q_bias`/`v_bias`, `gamma_1`, shared `rel_pos_bias`), and wrappers
around timm-style names (MoCo v3 `module.base_encoder.`, DINO `teacher`/`backbone.`, MAE's
decoder beside its encoder). `adopt` recognises the naming, renames and reshapes tensors, drops
what is not part of the encoder (saying how many), and reads off settings the weights imply
(class count, distillation token, pooling, BEiT's bias layout); a setting the user passes wins.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import torch

WRAPPERS = ("model", "state_dict", "model_state", "teacher")   # trainers' dicts around the weights
ENCODER_PREFIXES = ("visual.", "base_encoder.", "backbone.")   # CLIP, MoCo v3, DINO: the image encoder's keys
DECODER_KEYS = re.compile(r"^(decoder_|mask_token$|lm_head\.)")   # MAE's decoder, BEiT's pre-training head


@dataclass
class Adopted:
    state: dict[str, torch.Tensor]
    naming: str                                          # timm, openai-clip, beit
    settings: dict = field(default_factory=dict)         # model settings the weights imply
    dropped: list[str] = field(default_factory=list)     # keys that are not the encoder's


def unwrap(payload):
    """The state dict inside common trainer checkpoints ({'model': ...}, DINO's {'teacher': ...})."""
    for wrapper in WRAPPERS:
        if isinstance(payload, dict) and isinstance(payload.get(wrapper), dict):
            payload = payload[wrapper]
    return payload


def adopt(state: dict[str, torch.Tensor], family: str, feature_extractor: bool) -> Adopted:
    """`state` in edgevit's names for a model of `family` ('vit' or other: unchanged but for
    prefixes). `feature_extractor`: the chosen model has no head, so a pre-training head in the
    file (DINO's, MoCo v3's projector) is dropped rather than refused."""
    if family == "EfficientViT":   # the official names are edgevit's; its `backbone.` is not a wrapper
        return _from_efficientvit(dict(state))
    state, dropped = _strip_wrappers(dict(state))
    if family != "vit":
        return Adopted(state, "timm", dropped=dropped)
    if "class_embedding" in state or "conv1.weight" in state:
        adopted = _from_openai_clip(state)
    elif any(k.endswith(("q_bias", "gamma_1")) or k.startswith("rel_pos_bias.") for k in state):
        adopted = _from_beit(state)
    else:
        adopted = Adopted({_timm_layer_scale(k): v for k, v in state.items()}, "timm")
    adopted.dropped = dropped + _drop_outside_encoder(adopted.state, feature_extractor)
    adopted.settings = {**_implied_settings(adopted.state, feature_extractor), **adopted.settings}
    return adopted


def _strip_wrappers(state: dict) -> tuple[dict, list[str]]:
    """Remove DataParallel's `module.` and keep only the image encoder's keys of a bigger model."""
    if state and all(k.startswith("module.") for k in state):
        state = {k[len("module."):]: v for k, v in state.items()}
    for prefix in ENCODER_PREFIXES:
        if any(k.startswith(prefix) for k in state):
            return ({k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)},
                    [k for k in state if not k.startswith(prefix)])
    return state, []


def _drop_outside_encoder(state: dict, feature_extractor: bool) -> list[str]:
    outside = [k for k in state if DECODER_KEYS.match(k) or (feature_extractor and k.startswith("head."))]
    for k in outside:
        del state[k]
    return outside


def _implied_settings(state: dict, feature_extractor: bool) -> dict:
    settings = {}
    if "dist_token" in state:
        settings["distilled"] = True
    if "fc_norm.weight" in state and "norm.weight" not in state:
        settings["global_pool"] = "avg"
    elif "norm.weight" in state and "fc_norm.weight" not in state:
        settings["global_pool"] = "token"
    if "rel_pos_bias.relative_position_bias_table" in state:
        settings["rel_pos_bias"] = "shared"
    elif any(k.endswith("attn.relative_position_bias_table") for k in state):
        settings["rel_pos_bias"] = "block"
    if "cls_token" in state:
        settings["pos_embed"] = "pos_embed" in state
    if "blocks.0.gamma_1" in state:
        settings["layer_scale"] = 0.1     # only the init value; the learned scales load from the file
    head = state.get("head.weight")
    if head is not None and not feature_extractor:
        settings["num_classes"] = int(head.shape[0])
        settings["head_bias"] = "head.bias" in state
    return settings


EFFICIENTVIT_CLASSIFIER = "head.op_list.3.linear.weight"


def _from_efficientvit(state: dict) -> Adopted:
    """mit-han-lab/efficientvit's classification checkpoints: `backbone.` and `head.` keys as
    edgevit's EfficientViT names them (DataParallel's `module.` removed); the class count is read
    off the classifier."""
    if state and all(k.startswith("module.") for k in state):
        state = {k[len("module."):]: v for k, v in state.items()}
    classifier = state.get(EFFICIENTVIT_CLASSIFIER)
    settings = {"num_classes": int(classifier.shape[0])} if classifier is not None and classifier.ndim == 2 else {}
    return Adopted(state, "efficientvit", settings)


def _timm_layer_scale(key: str) -> str:
    """timm's LayerScale (`blocks.N.ls1.gamma`) is BEiT's `gamma_1`, the name edgevit uses."""
    return re.sub(r"\.ls([12])\.gamma$", r".gamma_\1", key)


CLIP_BLOCK = {"ln_1": "norm1", "ln_2": "norm2", "attn.in_proj_weight": "attn.qkv.weight",
              "attn.in_proj_bias": "attn.qkv.bias", "attn.out_proj": "attn.proj", "mlp.c_fc": "mlp.fc1",
              "mlp.c_proj": "mlp.fc2"}


def _from_openai_clip(state: dict) -> Adopted:
    """OpenAI CLIP's VisionTransformer (also open_clip's): pre-norm, quick-GELU, no patch bias,
    class token and positions without batch axes, a bias-free projection `proj` [C, D]."""
    out = {}
    for key, value in state.items():
        if key == "conv1.weight":
            out["patch_embed.proj.weight"] = value
        elif key == "class_embedding":
            out["cls_token"] = value.reshape(1, 1, -1)                          # (C,) -> (1, 1, C)
        elif key == "positional_embedding":
            out["pos_embed"] = value.unsqueeze(0)                              # (T, C) -> (1, T, C)
        elif key == "proj":
            out["head.weight"] = value.t().contiguous()                        # (C, D) -> (D, C)
        elif key.startswith(("ln_pre.", "ln_post.")):
            out[key.replace("ln_pre.", "norm_pre.").replace("ln_post.", "norm.")] = value
        elif m := re.match(r"transformer\.resblocks\.(\d+)\.(.+)$", key):
            rest = m.group(2)
            for theirs, ours in CLIP_BLOCK.items():
                if rest == theirs or rest.startswith(theirs + "."):
                    rest = ours + rest[len(theirs):]
                    break
            out[f"blocks.{m.group(1)}.{rest}"] = value
        else:
            out[key] = value
    settings = {"act": "quick_gelu", "pre_norm": True, "patch_bias": False, "norm_eps": 1e-5, "head_bias": False}
    if "head.weight" in out:
        settings["num_classes"] = int(out["head.weight"].shape[0])
    else:
        settings["num_classes"] = 0
    return Adopted(out, "openai-clip", settings)


def _from_beit(state: dict) -> Adopted:
    """BEiT (unilm, and timm's Beit): q and v biases without a k bias, which is a qkv bias whose
    k third is zero; layer scales `gamma_1/2` and the bias tables keep their names."""
    out = {}
    for key, value in state.items():
        if key.endswith("attn.q_bias"):
            stem = key[: -len("q_bias")]
            v_bias = state[stem + "v_bias"]
            out[stem + "qkv.bias"] = torch.cat([value, torch.zeros_like(value), v_bias])   # (3C,)
        elif key.endswith("attn.v_bias"):
            continue
        else:
            out[key] = value
    return Adopted(out, "beit", {"norm_eps": 1e-6})
