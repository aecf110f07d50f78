import os
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("OVSEG_PROGRESS", "0")

import json
import pytest


@pytest.fixture(scope="session")
def clipdir(tmp_path_factory):
    "A tiny random open_clip model saved in the open_clip directory format (as the embedded CLIP is)."
    from ovseg.testing import tiny_clip_dir
    return tiny_clip_dir(tmp_path_factory.mktemp("clip"))
