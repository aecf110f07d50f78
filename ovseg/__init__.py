"""Open-vocabulary semantic segmentation on frozen vision and language encoders: Fusioner, zsseg, OVSegmentor, FISA and dense CLIP in one notebook-first codebase.

Entry points, imported on first use: `ovseg.segment(image, classes, model=...)`, `ovseg.load_model`, `ovseg.create_visual_encoder`, `ovseg.create_text_encoder`, `ovseg.create_clip`, `ovseg.list_encoders`, `ovseg.load_config`; the command line is `ovseg` or `python -m ovseg`.

Every module is defined, explained and tested in one notebook: `ovseg.NAME` in `nbs/NN_NAME.ipynb` (each module's header names it: `File to edit`). Topic guides: `docs/datasets.md`, `docs/encoders.md`, `docs/training.md`, `docs/reproduction.md`, `docs/benchmarks.md`, `docs/adding-a-method.md` (a new method: one notebook, one stage, one params block).

Modules, in the order data flows:

- `ovseg.compat`: makes torchvision import beside CPU-only torch (no torch import at start-up).
- `ovseg.core`: typed settings from `params.yaml` (the shared sections; each module registers its own, found by `discover`), seeding, devices, atomic writes, progress bars.
- `ovseg.inputs`: class lists, files, model names and devices checked before torch loads (what the CLI checks first).
- `ovseg.metrics`: mIoU / FB-IoU / hIoU / PQ as the papers' code computes them.
- `ovseg.embedded`: the seeded synthetic world of coloured shapes the embedded profile runs on.
- `ovseg.images`: the one image reader, joint image–label transforms, batching.
- `ovseg.data`: the benchmarks' datasets in their standard layouts and the dataset registry.
- `ovseg.prepare`: download, verify, unpack and convert the benchmarks.
- `ovseg.prompts`: prompt templates and the one prompt ensemble (class names become text).
- `ovseg.paper`: the paper pipeline's inputs: the dataset folders and weight files of docs/weights.md, one error naming every missing one.
- `ovseg.realdata`: the real data read in place (CamVid in the SegNet layout with zero-shot folds, Flickr8k captions) for the `real` pipeline.
- `ovseg.encoders`: frozen visual and text encoders behind one interface and one registry (timm, transformers, EfficientNet-Lite).
- `ovseg.openclip`: the open_clip family (pretrained CLIPs, the embedded CLIP), its loader and weight checks (the OpenAI/QuickGELU rule).
- `ovseg.cliptrain`: the small CLIP the embedded profile trains, since no CLIP weights install offline.
- `ovseg.cache`: dense features of frozen encoders computed once and reused.
- `ovseg.windows`: sliding-window and test-time-augmented inference.
- `ovseg.train`: the one training loop (AdamW, schedules, bf16, exact resume), checkpoints and the arch registry.
- `ovseg.experiment`: the method contract, what the gallery and summary know of each method (`register_method`), episode and semantic evaluation, runs over folds x seeds, tables.
- `ovseg.fusioner`: Fusioner (Ma et al., BMVC 2022).
- `ovseg.maskgen`: class-agnostic mask proposals, Hungarian matching, set losses, masked crops.
- `ovseg.twostage`: the two-stage zsseg baseline (Xu et al., ECCV 2022).
- `ovseg.grouping`: GroupViT's grouping blocks.
- `ovseg.ovsegmentor`: OVSegmentor (Xu et al., CVPR 2023).
- `ovseg.fisa`: FISA (Chng et al., arXiv 2409.16278).
- `ovseg.denseclip`: training-free dense CLIP.
- `ovseg.segment`: `segment(image, classes, model=...)`, visualisation, saved results.
- `ovseg.cli`: the `ovseg` command (`segment`, `eval`, `train`, `models`).
- `ovseg.testing`: stand-ins for tests and demos (random encoders, tiny CLIPs, random-weight files of the paper's encoders).

Modules:

- `ovseg.cliptrain`: No CLIP weights can be installed offline, so the embedded profile trains its own: a small open_clip architecture (a custom config), trained contrastively on the embedded world's image–caption pairs, saved in open_clip's directory format and then used frozen like any pretrained CLIP (`create_clip("open_clip:outputs/embedded_clip")`).
- `ovseg.data`: Datasets for PASCAL-5i, COCO-20i, FSS-1000 / Mosaic-4, VOC, COCO-Stuff, ADE20K, PASCAL Context and COCO-Object read from the layouts the papers' code expects, and the registry that names them. Reading images and joint transforms are `ovseg.images` (`03b_images`); sliding-window inference is `ovseg.windows` (`07a_windows`); download / check / unpack / convert is `ovseg.prepare` (`04c_prepare`).
- `ovseg.encoders`: Every method in ovseg reads images and class names through the two small classes defined here, so any visual encoder can be paired with any language encoder. Class names become text through `ovseg.prompts` (`04d_prompts`); the open_clip family (pretrained CLIPs, the embedded CLIP) and its weight checks are `ovseg.openclip` (`05a_openclip`), found by the registry below.
- `ovseg.fisa`: A frozen, pretrained mask generator; a CLIP mask classifier that sees the class names early in its image encoder (SEVE), trained in a small part of CLIP only (SIMO) (Chng, Qiu, Han, Ding, Ding, Huang, "Adapting Vision-Language Model with Fine-grained Semantics for Open-Vocabulary Segmentation", arXiv 2409.16278, 2024).
- `ovseg.maskgen`: Class-agnostic mask proposals (an FPN pixel decoder and a DETR-style transformer decoder, as in MaskFormer), Hungarian matching and the set losses that train them, and the operations every two-stage method applies to proposals: semantic inference, batched masked crops for CLIP, mask pooling, the seen/unseen ensemble of zsseg, and oracle helpers.
- `ovseg.openclip`: The open_clip family of `ovseg.encoders` (`open_clip:<name or dir>`, `embedded-clip`): the one loader of open_clip models in ovseg (`load_open_clip`), the checks that a weights file fits the architecture it is loaded into (QuickGELU for OpenAI's weights, the folder format), and the dense features of CLIP towers.
- `ovseg.segment`: `segment(image, classes, model=...)`: one call from any image and any list of class names to a label map at the image's resolution, per-class probabilities and the class list used; for trained ovseg checkpoints and training-free dense CLIP alike. Visualisation helpers and the `ovseg` command line live here too.
- `ovseg.twostage`: Class-agnostic mask proposals trained on seen classes, each proposal classified twice (by its query embedding against CLIP text, and by the frozen CLIP image encoder on its masked crop), the two combined with seen and unseen classes weighted the opposite way (Xu et al., "A Simple Baseline for Open-Vocabulary Semantic Segmentation with Pre-trained Vision-language Model", ECCV 2022)."""

__version__ = "0.1.0"

# Not generated by nbdev (it only keeps __version__ and the docstring above current here).
# Make `import torchvision` work on CPU-only torch before anything imports it; see
# nbs/00_compat.ipynb. This imports neither torch nor torchvision.
from .compat import install_torchvision_hook as _install_torchvision_hook
_install_torchvision_hook()

# The main entry points, imported on first use (PEP 562) so that `import ovseg` stays fast
# (it imports neither torch nor open_clip; `python -X importtime -c "import ovseg"`).
_LAZY = {
    "load_model": "ovseg.segment", "available_models": "ovseg.segment", "SegmentResult": "ovseg.segment",
    "create_visual_encoder": "ovseg.encoders", "create_text_encoder": "ovseg.encoders",
    "create_clip": "ovseg.encoders", "list_encoders": "ovseg.encoders", "load_config": "ovseg.core",
}

import sys as _sys, types as _types

class _CallableModule(_types.ModuleType):
    "`ovseg.segment` is a module and its main function at once: `ovseg.segment(image, classes)` calls `segment`."
    def __call__(self, *args, **kwargs): return self.segment(*args, **kwargs)
    @property
    def __signature__(self):    # inspect.signature / Jupyter's Shift-Tab show segment's real parameters
        import inspect
        return inspect.signature(self.segment)

class _Package(_types.ModuleType):
    # The import system sets `ovseg.segment` to the submodule whenever it is first imported (by
    # `ovseg.segment`, `from ovseg.segment import ...` or another module); make it callable then.
    def __setattr__(self, name, value):
        if name == "segment" and isinstance(value, _types.ModuleType) and type(value) is _types.ModuleType:
            value.__class__ = _CallableModule
        super().__setattr__(name, value)

_sys.modules[__name__].__class__ = _Package

def __getattr__(name: str):
    import importlib
    if name == "segment": return importlib.import_module("ovseg.segment")  # sets the attribute itself
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'ovseg' has no attribute {name!r}")

def __dir__():
    return sorted(set(globals()) | set(_LAZY) | {"segment"})
