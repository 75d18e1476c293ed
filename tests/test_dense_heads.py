"""Mask R-CNN and UperNet on every registered family (forward, backward, every parameter trained), the auxiliary
loss, sliding-window inference."""
import pytest
import torch
import torch.nn.functional as F
from timm.models import is_model

import mambazoo
from mambazoo.dense import TAP_SPECS, UperNet, build_mask_rcnn, slide_inference

pytestmark = pytest.mark.usefixtures("one_torch_thread")

FAMILIES = ("vim", "plainmamba", "mambaout", "mambavision", "spatialmamba")
TEST_MODELS = [TAP_SPECS[family].test_model for family in FAMILIES]
TINY_RCNN = dict(min_size=64, max_size=96, fpn_channels=16, box_representation=32, mask_head_channels=8,
                 rpn_pre_nms_top_n_train=200, rpn_post_nms_top_n_train=100, box_batch_size_per_image=64,
                 rpn_pre_nms_top_n_test=100, rpn_post_nms_top_n_test=50, box_detections_per_img=10)


def _skip_unregistered(name: str) -> None:
    mambazoo.list_models()
    if not is_model(name):
        pytest.skip(f"{name} not registered (family not landed)")


def _targets() -> tuple[list[torch.Tensor], list[dict]]:
    images = [torch.rand(3, 64, 80), torch.rand(3, 70, 64)]
    masks = torch.zeros(2, 70, 64, dtype=torch.uint8)
    masks[0, 5:30, 10:40] = 1
    masks[1, 40:65, 20:60] = 1
    first = torch.zeros(1, 64, 80, dtype=torch.uint8)
    first[0, 10:50, 20:60] = 1
    targets = [dict(boxes=torch.tensor([[20.0, 10.0, 60.0, 50.0]]), labels=torch.tensor([1]), masks=first),
               dict(boxes=torch.tensor([[10.0, 5.0, 40.0, 30.0], [20.0, 40.0, 60.0, 65.0]]),
                    labels=torch.tensor([2, 3]), masks=masks)]
    return images, targets


@pytest.mark.parametrize("name", TEST_MODELS)
def test_mask_rcnn_trains_every_parameter_and_predicts_in_image_coordinates(name: str) -> None:
    _skip_unregistered(name)
    torch.manual_seed(0)
    model = build_mask_rcnn(name, num_classes=3, **TINY_RCNN)
    images, targets = _targets()
    losses = model(images, targets)
    assert set(losses) == {"loss_classifier", "loss_box_reg", "loss_mask", "loss_objectness", "loss_rpn_box_reg"}
    sum(losses.values()).backward()
    assert not [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    model.eval()
    model.roi_heads.score_thresh = 0.0
    with torch.no_grad():
        outputs = model(images)
    for image, output in zip(images, outputs):
        assert set(output) == {"boxes", "labels", "scores", "masks"}
        assert output["masks"].shape[1:] == (1, *image.shape[-2:])
        assert (output["labels"] >= 1).all() and (output["labels"] <= 3).all()
        assert (output["boxes"][:, 2] <= image.shape[-1]).all() and (output["boxes"][:, 3] <= image.shape[-2]).all()


def test_mask_rcnn_rejects_bad_arguments() -> None:
    with pytest.raises(ValueError, match="num_classes must be a positive int"):
        build_mask_rcnn("test_mambaout", num_classes=0)
    with pytest.raises(ValueError, match="no dense tap description"):
        build_mask_rcnn("resnet18", num_classes=2)


@pytest.mark.parametrize("name", TEST_MODELS)
def test_upernet_trains_every_parameter_at_any_input_size(name: str) -> None:
    _skip_unregistered(name)
    torch.manual_seed(0)
    model = UperNet(name, num_classes=5, channels=16, aux_channels=8)
    images, labels = torch.rand(2, 3, 70, 100), torch.randint(0, 5, (2, 70, 100))
    labels[:, :5] = 255
    losses = model(images, labels)  # with targets: the training losses
    losses["loss"].backward()
    assert not [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    model.eval()
    with torch.no_grad():
        assert model(images).shape == (2, 5, 70, 100)


def test_upernet_loss_is_decode_plus_0_4_auxiliary_cross_entropy() -> None:
    torch.manual_seed(0)
    model = UperNet("test_mambaout", num_classes=4, channels=16, aux_channels=8).eval()  # eval: no dropout
    images, labels = torch.rand(1, 3, 64, 96), torch.randint(0, 4, (1, 64, 96))
    labels[0, 0, :10] = 255
    with torch.no_grad():
        losses = model.losses(images, labels)
        features = list(model.backbone((images - model.mean) / model.std).values())
        aux = F.interpolate(model.auxiliary_head(features[2]), size=(64, 96), mode="bilinear", align_corners=False)
        decode = F.interpolate(model.decode_head(features), size=(64, 96), mode="bilinear", align_corners=False)
    valid = labels != 255
    def cross_entropy(logits):
        return -logits.log_softmax(1).gather(1, labels.clamp(max=3)[:, None])[:, 0][valid].mean()
    torch.testing.assert_close(losses["loss_aux"], 0.4 * cross_entropy(aux))
    torch.testing.assert_close(losses["loss_decode"], cross_entropy(decode))
    torch.testing.assert_close(losses["loss"], losses["loss_aux"] + losses["loss_decode"])
    with pytest.raises(ValueError, match="targets must be"):
        model.losses(images, labels[:, :32])


def test_slide_inference_with_a_crop_covering_the_image_equals_whole_image_inference() -> None:
    torch.manual_seed(0)
    model = UperNet("test_vim", num_classes=3, channels=16, aux_channels=0).eval()
    images = torch.rand(1, 3, 96, 80)
    whole = model.predict(images)
    assert torch.equal(model.predict(images, "slide", crop_size=96, stride=64), whole)
    assert torch.equal(model.predict(images, "slide", crop_size=(128, 200), stride=(10, 10)), whole)


def test_slide_inference_windows_and_averaging() -> None:
    windows = []

    def record(crop: torch.Tensor) -> torch.Tensor:
        windows.append(tuple(crop.shape[-2:]))
        return crop[:, :1] * 2 + 1  # a per-pixel function: sliding must reproduce it exactly

    images = torch.rand(1, 3, 10, 7)
    out = slide_inference(record, images, crop_size=(4, 7), stride=(3, 5))
    # mmseg grid: rows max(10 - 4 + 3 - 1, 0) // 3 + 1 = 3 (last one shifted back to end at 10), 1 column
    assert windows == [(4, 7)] * 3
    torch.testing.assert_close(out, images[:, :1] * 2 + 1)

    def offset(crop: torch.Tensor) -> torch.Tensor:  # each window votes its own index
        return torch.full((1, 1, *crop.shape[-2:]), float(len(windows)))

    windows.clear()
    out = slide_inference(lambda c: (windows.append(c), offset(c))[1], torch.zeros(1, 1, 10, 1), 4, 3)
    # windows cover rows [0,4) -> 1, [3,7) -> 2, [6,10) -> 3: rows 3 and 6 are averages of two windows
    expected = torch.tensor([1, 1, 1, 1.5, 2, 2, 2.5, 3, 3, 3]).view(1, 1, 10, 1)
    torch.testing.assert_close(out, expected)
    with pytest.raises(ValueError, match="must not exceed crop_size"):
        slide_inference(record, images, crop_size=4, stride=5)


@pytest.mark.parametrize("name", ["test_vim", "test_plainmamba", "test_mambaout"])
def test_upernet_builds_on_the_meta_device(name: str) -> None:
    model = UperNet(name, num_classes=150, device="meta")
    tensors = list(model.parameters()) + list(model.buffers())
    assert tensors and all(t.device.type == "meta" for t in tensors)


def test_mask_rcnn_builds_on_the_meta_device() -> None:
    with torch.device("meta"):
        model = build_mask_rcnn("test_vim", num_classes=80)
    assert {p.device.type for p in model.parameters()} == {"meta"}
