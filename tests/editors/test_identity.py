"""The no-edit baseline returns the source unchanged without running the model."""

import numpy as np
from PIL import Image

from editlab.editors.base import EditRequest, build_editor
from editlab.models.loading import load_components


def test_identity_returns_the_source_with_no_unet_call():
    c = load_components({"name": "tiny", "kind": "tiny", "seed": 0, "resolution": 64},
                        {"dtype": "float32", "vae_dtype": "float32"}, {"mode": "none"}, "cpu")
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8))
    result = build_editor({"name": "identity"}, c).edit(EditRequest(image, "a red circle", "a blue circle"))
    assert np.array_equal(np.asarray(result.edited), np.asarray(image)) and result.nfe == 0


def test_an_unknown_editor_parameter_is_a_clear_error():
    import pytest

    c = load_components({"name": "tiny", "kind": "tiny", "seed": 0, "resolution": 64},
                        {"dtype": "float32", "vae_dtype": "float32"}, {"mode": "none"}, "cpu")
    with pytest.raises(TypeError, match="editor identity has no parameter num_steps; it takes: none"):
        build_editor({"name": "identity", "num_steps": 5}, c)
    with pytest.raises(TypeError, match="editor ddim_p2p has no parameter guidance_sclae; it takes: num_steps"):
        build_editor({"name": "ddim_p2p", "guidance_sclae": 5}, c)
