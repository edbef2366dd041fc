"""Stage 1 folds mae_weight into masked_patch_loss(weight=) and still logs the unweighted MAE loss."""

import pytest
import torch

from moca.data.batch import VisionSpec
from moca.data.masking import CptCollator, MaskingConfig, ModalityMasker
from moca.modeling import MocaBackbone
from moca.stage1 import CptModel, LossConfig
from tests.moca.test_stage1_loss import MASK_ID, SPECIAL, VOCAB, _samples


@pytest.mark.parametrize("mae_weight", [0.1, 0.0])
def test_mae_weight_in_the_loss_and_unweighted_in_the_log(mae_weight):
    torch.manual_seed(0)
    bb = MocaBackbone.tiny(VOCAB, SPECIAL, hidden=32, layers=3, heads=2, kv_heads=1, vision_hidden=16).double()
    masker = ModalityMasker(MaskingConfig(0.4, 0.5, "noise"), MASK_ID, list(range(9)))
    batch = CptCollator(masker, VisionSpec.from_config(bb.vlm.config), pad_token_id=0, packed=True)(
        _samples(torch.Generator().manual_seed(0)), seed=3)
    batch.pixel_values, batch.mae_target = batch.pixel_values.double(), batch.mae_target.double()
    model = CptModel(bb, LossConfig(mlm_weight=1.0, mae_weight=1.0)).double()
    with torch.no_grad():
        ref = model(batch)                                     # weight 1: the plain MAE loss
    model.loss_config = LossConfig(mlm_weight=1.0, mae_weight=mae_weight)
    out = model(batch)
    assert ref["mae_loss"] > 0
    torch.testing.assert_close(out["mae_loss"], ref["mae_loss"], rtol=1e-12, atol=0)   # logged unweighted
    torch.testing.assert_close(out["loss"], ref["mlm_loss"] + mae_weight * ref["mae_loss"], rtol=1e-12, atol=0)
    out["loss"].backward()
    head = model.mae_decoder.head.weight.grad
    assert head is not None and (head.abs().sum() > 0) == (mae_weight > 0)
