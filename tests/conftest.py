import os
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("OVSEG_PROGRESS", "0")

import json
import pytest


@pytest.fixture(scope="session")
def clipdir(tmp_path_factory):
    "A tiny random open_clip model saved in the open_clip directory format (as the embedded CLIP is)."
    import open_clip, torch
    from safetensors.torch import save_file
    from ovseg.denseclip import TINY_CLIP_CFG
    d = tmp_path_factory.mktemp("clip")
    torch.manual_seed(0)
    save_file(open_clip.CLIP(**TINY_CLIP_CFG).state_dict(), str(d / "open_clip_model.safetensors"))
    (d / "open_clip_config.json").write_text(json.dumps({"model_cfg": TINY_CLIP_CFG, "preprocess_cfg": {}}))
    return d
