"""Networks of an editor's own: new modules over the shared weights, never patching the original."""

import pytest
import torch
from diffusers.models.attention_processor import AttnProcessor

from editlab.icd.lora import add_icd_adapters
from editlab.models.builders import build_tiny
from editlab.models.copies import own_copy, rebuilt


def test_own_copy_shares_the_storage_and_keeps_changes_to_itself():
    unet = build_tiny(seed=0)[0]
    copy = own_copy(unet)
    assert copy is not unet and copy.conv_in.weight.data_ptr() == unet.conv_in.weight.data_ptr()
    x, t, text = torch.randn(1, 4, 8, 8), torch.tensor(500), torch.randn(1, 77, 32)
    with torch.no_grad():
        same = copy(x, t, encoder_hidden_states=text).sample, unet(x, t, encoder_hidden_states=text).sample
    assert torch.equal(*same)
    add_icd_adapters(copy, rank=4)
    copy.set_attn_processor(AttnProcessor())
    assert not getattr(unet, "peft_config", None)
    assert all(type(p) is not AttnProcessor for p in unet.attn_processors.values())
    fp64 = own_copy(unet, torch.float64)
    assert fp64.dtype == torch.float64 and unet.dtype == torch.float32


def test_rebuilt_with_a_changed_config_and_a_refused_offloaded_module():
    unet = build_tiny(seed=0)[0]
    embedded, result = rebuilt(unet, time_cond_proj_dim=16)
    assert embedded.config.time_cond_proj_dim == 16 and result.missing_keys == ["time_embedding.cond_proj.weight"]
    unet.conv_in.weight = torch.nn.Parameter(torch.empty_like(unet.conv_in.weight, device="meta"))
    with pytest.raises(ValueError, match="offload=sequential"):
        own_copy(unet)
